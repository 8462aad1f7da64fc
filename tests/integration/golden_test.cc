// Checks the runtime against llama.cpp on the registry models in kModels,
// using fixtures recorded by scripts/record_golden.py --registry-name NAME
// (tests/golden/*.json): identical tokenisation, top-10 logits within a
// tolerance, and identical greedy continuations up to the first near-tie.
//
// Why a tolerance: llama.cpp's softmax uses a vectorised exp approximation
// and our kernels sum in another order; probabilities are then rounded to
// fp16 (on both sides), which turns last-bit differences into logit
// differences of a few tenths on these small models. Single-token prompts
// agree bit for bit. Each model's tolerance and its justification are with
// its entry in kModels.
//
// Every model in kModels must be in the model cache: a missing one FAILS its
// cases (scripts/test.sh fetches them all). PSA_MODEL overrides the path of
// smollm2-135m, the default model.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "compute_worker/model/llama_model.h"
#include "compute_worker/model/model_registry.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "compute_worker/runtime/sampler.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace psa {
namespace {

struct GoldenModel {
  const char* name;       // registry name (compute_worker/model/models.tsv)
  const char* fixture;    // under tests/golden/
  const char* test_name;  // gtest parameter name
  float logit_tolerance;  // absolute, on llama.cpp's top-10 logits
  float near_tie;         // llama.cpp top1-top2 gap counted as a tie
};

// Measured on x86-64 (AVX-512 host, Release build), CPU runtime, against
// llama-cpp-python 0.3.36 with 2 threads.
const GoldenModel kModels[] = {
    // SmolLM2-135M-Instruct Q4_1: logits are ~10-35; worst top-10 difference
    // measured 0.26 (over 4 prompts x 10 tokens), so 0.6 leaves > 2x margin.
    // Greedy agreement 109 of 192 tokens: the 100- and 1000-token cases
    // diverge at llama.cpp gaps of 0.19 and 0.09 (step 5 and 40), which two
    // logits off by < 0.3 each can swap; the 4000-token case is identical.
    {"smollm2-135m", "smollm2_q4_1.json", "smollm2_135m", 0.6f, 0.6f},
    // Qwen2.5-Coder-0.5B-Instruct Q5_0 (with Q4_K/Q6_K/Q8_0 tensors): logits
    // are ~10-23; worst top-10 difference measured 0.20 (chat question), so
    // 0.5 leaves 2.5x margin for other ISAs' kernels and summation orders
    // while a real bug (a missing bias, wrong RoPE) moves logits by whole
    // units. Greedy agreement 146 of 192 tokens: the 100- and 1000-token cases
    // are identical, the 4000-token one diverges at step 18, a llama.cpp gap
    // of 0.09. A near-tie is a gap < 0.5: two logits each off by up to 0.25
    // (above the 0.20 measured) can swap there, and no more than that.
    {"qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b.json", "qwen2_5_coder_0_5b", 0.5f, 0.5f},
};

void PrintTo(const GoldenModel& m, std::ostream* os) { *os << m.name; }

// A model and its fixtures, loaded once per process and kept for all cases.
struct Loaded {
  std::unique_ptr<LlamaModel> model;
  nlohmann::json fixtures;
  std::string error;  // non-empty: loading failed, say why
};

const Loaded& LoadGolden(const GoldenModel& m) {
  static auto* cache = new std::map<std::string, Loaded>();
  auto it = cache->find(m.name);
  if (it != cache->end()) return it->second;
  Loaded& l = (*cache)[m.name];
  const std::string fetch = std::string("scripts/fetch_model.sh ") + m.name;
  std::string name_or_path = m.name;
  const char* override_path = std::getenv("PSA_MODEL");
  const bool overridden = std::string(m.name) == "smollm2-135m" && override_path != nullptr &&
                          *override_path != '\0';
  if (overridden) name_or_path = override_path;
  auto model = LlamaModel::Load(name_or_path);
  if (!model.ok()) {
    l.error = std::string(model.status().message());
    if (l.error.find(fetch) == std::string::npos || overridden) {
      l.error += "\nFetch the model with " + fetch +
                 (overridden ? " (or point PSA_MODEL at it)." : ".");
    }
    return l;
  }
  l.model = std::move(*model);
  const std::string path = std::string(PSA_SOURCE_DIR) + "/tests/golden/" + m.fixture;
  std::ifstream in(path);
  if (!in.good()) {
    l.error = "missing " + path + "; record it with scripts/record_golden.py --registry-name " +
              m.name;
    return l;
  }
  l.fixtures = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (l.fixtures.is_discarded()) l.error = "cannot parse " + path;
  return l;
}

class GoldenTest : public ::testing::TestWithParam<GoldenModel> {
 protected:
  void SetUp() override {
    const Loaded& l = LoadGolden(GetParam());
    ASSERT_TRUE(l.error.empty()) << GetParam().name << ": " << l.error;
    model_ = l.model.get();
    fixtures_ = &l.fixtures;
  }
  const char* name() const { return GetParam().name; }
  const LlamaModel* model_ = nullptr;
  const nlohmann::json* fixtures_ = nullptr;
};

std::string Ids(const std::vector<TokenId>& ids, size_t from, size_t n) {
  std::string s;
  for (size_t i = from; i < ids.size() && i < from + n; ++i) {
    s += (i > from ? " " : "") + std::to_string(ids[i]);
  }
  return "[" + s + (from + n < ids.size() ? " ...]" : "]");
}

// The fixture was recorded from the file the registry names.
TEST_P(GoldenTest, FixtureIsForTheRegisteredModel) {
  const RegisteredModel* reg = nullptr;
  for (const RegisteredModel& m : ModelRegistry()) {
    if (m.name == name()) reg = &m;
  }
  ASSERT_NE(reg, nullptr) << name() << " is not in the model registry";
  EXPECT_EQ((*fixtures_)["model_sha256"].get<std::string>(), reg->sha256)
      << GetParam().fixture << " was recorded from another file than " << reg->file;
}

TEST_P(GoldenTest, TokenizationMatchesLlamaCpp) {
  const Tokenizer& tok = model_->tokenizer();
  int n = 0;
  for (const auto& c : (*fixtures_)["tokenize"]) {
    const std::string text = c["text"];
    const bool special = c["special"];
    const std::vector<TokenId> want = c["ids"].get<std::vector<TokenId>>();
    const std::vector<TokenId> got = tok.Encode(text, false, special);
    if (got != want) {
      size_t i = 0;
      while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
      ADD_FAILURE() << name() << ": text: " << text << " special: " << special
                    << "\nfirst difference at id " << i << ": ours " << Ids(got, i, 8)
                    << " llama.cpp " << Ids(want, i, 8) << " (lengths " << got.size() << " vs "
                    << want.size() << ")";
    }
    EXPECT_EQ(tok.Decode(got, /*render_special=*/special), text)
        << name() << ": round trip of: " << text;
    ++n;
  }
  EXPECT_GE(n, 10);
}

TEST_P(GoldenTest, TopLogitsMatchLlamaCpp) {
  const float tolerance = GetParam().logit_tolerance;
  const float near_tie = GetParam().near_tie;
  LlamaRuntime rt(*model_, RuntimeOptions{});
  float worst = 0;
  int case_index = 0;
  for (const auto& c : (*fixtures_)["top_logits"]) {
    const std::vector<TokenId> prompt = c["prompt_ids"].get<std::vector<TokenId>>();
    KvCache kv = rt.NewCache();
    std::vector<float> logits;
    ASSERT_TRUE(rt.Prefill(&kv, prompt, &logits).ok());
    const auto& top = c["top"];
    ASSERT_EQ(top.size(), 10u);
    // Our top-1 must be llama.cpp's, or tied with it within near_tie there.
    const int ours = ArgMax(logits.data(), static_cast<int>(logits.size()));
    const float ref_max = top[0][1];
    bool tied = false;
    for (const auto& entry : top) {
      tied |= entry[0].get<int>() == ours && ref_max - entry[1].get<float>() < near_tie;
    }
    EXPECT_TRUE(tied) << name() << " case " << case_index << ": top-1 " << ours << " ("
                      << logits[ours] << ") is not llama.cpp's top-1 " << top[0][0] << " ("
                      << ref_max << ", ours " << logits[top[0][0].get<int>()]
                      << ") or a near-tie of it, for a " << prompt.size() << "-token prompt";
    float case_worst = 0;
    for (const auto& entry : top) {
      const int id = entry[0];
      const float want = entry[1];
      const float diff = std::fabs(logits[id] - want);
      case_worst = std::max(case_worst, diff);
      EXPECT_LE(diff, tolerance) << name() << " case " << case_index << " ("
                                 << prompt.size() << "-token prompt): token " << id << " ours "
                                 << logits[id] << " llama.cpp " << want;
    }
    std::printf("%s top_logits[%d] (%zu tokens): max |logit - llama.cpp| %.4f\n", name(),
                case_index, prompt.size(), case_worst);
    worst = std::max(worst, case_worst);
    ++case_index;
  }
  std::printf("%s: max |logit - llama.cpp| over top-10s: %.4f (tolerance %.2f)\n", name(), worst,
              tolerance);
  RecordProperty("max_logit_diff", std::to_string(worst));
}

TEST_P(GoldenTest, GreedyContinuationsMatchUpToFirstNearTie) {
  const float near_tie = GetParam().near_tie;
  LlamaRuntime rt(*model_, RuntimeOptions{});
  size_t agreed = 0, total = 0;
  for (const auto& c : (*fixtures_)["greedy"]) {
    const std::string case_name = c["name"];
    const std::vector<TokenId> prompt = c["prompt_ids"].get<std::vector<TokenId>>();
    const std::vector<TokenId> want = c["tokens"].get<std::vector<TokenId>>();
    const std::vector<float> gaps = c["gaps"].get<std::vector<float>>();
    ASSERT_EQ(gaps.size(), want.size());
    KvCache kv = rt.NewCache();
    std::vector<float> logits;
    ASSERT_TRUE(rt.Prefill(&kv, prompt, &logits).ok());
    size_t i = 0;
    TokenId got = 0;
    for (; i < want.size(); ++i) {
      got = ArgMax(logits.data(), static_cast<int>(logits.size()));
      if (got != want[i]) break;
      ASSERT_TRUE(rt.Prefill(&kv, {&got, 1}, &logits).ok());
    }
    agreed += i;
    total += want.size();
    if (i == want.size()) {
      std::printf("%s %s: all %zu greedy tokens identical\n", name(), case_name.c_str(),
                  want.size());
      continue;
    }
    std::printf("%s %s: identical for %zu of %zu tokens; diverged at a gap of %.4f in llama.cpp "
                "(ours %d = %.4f, llama.cpp's %d = %.4f here)\n",
                name(), case_name.c_str(), i, want.size(), gaps[i], got, logits[got], want[i],
                logits[want[i]]);
    EXPECT_LT(gaps[i], near_tie) << name() << " " << case_name << ": diverged at step " << i
                                 << " where llama.cpp's top-1 " << want[i] << " led by "
                                 << gaps[i] << "; we chose " << got << " (" << logits[got]
                                 << " vs " << logits[want[i]] << ")";
  }
  std::printf("%s: greedy agreement %zu of %zu tokens\n", name(), agreed, total);
  RecordProperty("greedy_agreement", std::to_string(agreed) + "/" + std::to_string(total));
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenTest, ::testing::ValuesIn(kModels),
                         [](const ::testing::TestParamInfo<GoldenModel>& info) {
                           return std::string(info.param.test_name);
                         });

}  // namespace
}  // namespace psa
