// Sparse attention's output is a function of the model, the prompt, the
// sampling parameters and the policy: not of whether a generation was
// resumed (its earlier tokens recomputed from the token history), nor of
// what a block pool holds.
#include <cstring>
#include <vector>

#include "common/attention_policy.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

std::vector<TokenId> Tokens(int n, int vocab, uint32_t seed) {
  std::vector<TokenId> t;
  uint32_t x = seed * 2654435761u + 11;
  for (int i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    t.push_back(static_cast<TokenId>(x % vocab));
  }
  return t;
}

class DeterminismTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    testing::TinyModelSpec spec;
    spec.n_ctx = 2048;
    spec.seed = 7;
    model_ = LlamaModel::Load(testing::WriteTempFile(testing::BuildTinyLlamaGguf(spec),
                                                     "determinism.gguf"))
                 ->release();
  }
  static void TearDownTestSuite() { delete model_; }
  inline static LlamaModel* model_ = nullptr;
};

// A generation resumed after k tokens (the prompt plus those tokens, as the
// router sends it to another worker, or as a worker rebuilds a cache whose
// pages were lost) continues with exactly the uninterrupted tokens under a
// sparse policy: the resumed tokens' rows are recomputed as the decode
// steps that made them, not as prompt rows (which every policy attends
// densely).
TEST_F(DeterminismTest, AResumedGenerationContinuesAsTheUninterruptedOne) {
  for (const char* spec : {"psa:eps=0.5,min_blocks=2", "topk:k=8", "dense"}) {
    SCOPED_TRACE(spec);
    const AttentionPolicy policy = *AttentionPolicy::Parse(spec);
    const std::unique_ptr<AttentionBackend> backend = MakeAttention(policy);
    LlamaRuntime rt(*model_, RuntimeOptions{}, MakeAttention(policy));
    GenerationRequest req;
    req.prompt = Tokens(1000, model_->hparams().n_vocab, 3);
    req.max_tokens = 20;
    req.ignore_eos = true;
    req.attention = backend.get();
    absl::StatusOr<GenerationResult> full = Generate(rt, req);
    ASSERT_TRUE(full.ok()) << full.status();
    ASSERT_EQ(full->tokens.size(), 20u);
    if (policy.kind != AttentionPolicy::Kind::kDense) {
      // Sparse for real, else the test shows nothing.
      EXPECT_LT(full->kv_blocks_touched, full->kv_blocks_total * 4 / 5);
    }
    for (int k : {1, 3, 8}) {
      GenerationRequest resumed = req;
      resumed.prompt.insert(resumed.prompt.end(), full->tokens.begin(), full->tokens.begin() + k);
      resumed.resumed = k;
      absl::StatusOr<GenerationResult> got = Generate(rt, resumed);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->tokens, full->tokens) << "resumed after " << k;
    }
  }
}

// A prompt's rows are prompt rows however the prompt is cut: a last chunk
// of one row (after a prefix hit, at a token budget or a pass boundary) is
// attended as the one-pass prefill attends it, not as a decode step.
TEST_F(DeterminismTest, APromptEndingInAOneRowChunkEqualsItsOnePassPrefill) {
  const AttentionPolicy policy = *AttentionPolicy::Parse("psa:eps=0.5,min_blocks=2");
  const std::vector<TokenId> tokens = Tokens(1000, model_->hparams().n_vocab, 9);
  const absl::Span<const TokenId> all(tokens);
  LlamaRuntime rt(*model_, RuntimeOptions{}, MakeAttention(policy));
  std::vector<float> one_pass, got;
  KvCache a = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&a, all, &one_pass).ok());
  // Prefill() of the last row alone.
  KvCache b = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&b, all.subspan(0, 999), &got).ok());
  ASSERT_TRUE(rt.Prefill(&b, all.subspan(999), &got).ok());
  EXPECT_EQ(got, one_pass);
  // Passes of 333 rows: the last pass holds one row of the prompt.
  RuntimeOptions small;
  small.max_batch_tokens = 333;
  LlamaRuntime rt333(*model_, small, MakeAttention(policy));
  KvCache c = rt333.NewCache();
  ASSERT_TRUE(rt333.Prefill(&c, all, &got).ok());
  EXPECT_EQ(got, one_pass);
  // The same row as a decode step differs (else the test could not tell).
  KvCache d = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&d, all.subspan(0, 999), &got).ok());
  BatchEntry step{&d, all.subspan(999, 1), true, nullptr, nullptr};
  ASSERT_TRUE(rt.Forward({&step, 1}, &got).ok());
  EXPECT_NE(got, one_pass);
}

// What makes the difference: under a sparse policy the cache a resume
// builds equals, bit for bit, the one the decode steps built, and differs
// from a prefill of the same tokens (the old resume path), whose rows are
// attended densely.
TEST_F(DeterminismTest, ResumedRowsAreRecomputedAsTheDecodeStepsThatMadeThem) {
  const AttentionPolicy policy = *AttentionPolicy::Parse("topk:k=4");
  const std::unique_ptr<AttentionBackend> backend = MakeAttention(policy);
  LlamaRuntime rt(*model_, RuntimeOptions{}, MakeAttention(policy));
  const std::vector<TokenId> tokens = Tokens(600, model_->hparams().n_vocab, 5);
  const int resumed = 8;
  const absl::Span<const TokenId> all(tokens);
  std::vector<float> logits;
  // The decode steps.
  KvCache decoded = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&decoded, all.subspan(0, tokens.size() - resumed), &logits).ok());
  for (size_t i = tokens.size() - resumed; i < tokens.size(); ++i) {
    BatchEntry step{&decoded, all.subspan(i, 1), true, backend.get(), nullptr};
    ASSERT_TRUE(rt.Forward({&step, 1}, &logits).ok());
  }
  const std::vector<float> decoded_logits = logits;
  KvCache resumed_kv = rt.NewCache();
  ASSERT_TRUE(PrefillResumable(rt, &resumed_kv, all, resumed, backend.get(), &logits).ok());
  EXPECT_EQ(logits, decoded_logits);
  KvCache prefilled = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&prefilled, all, &logits).ok());
  EXPECT_NE(logits, decoded_logits);  // else this test could not tell the paths apart
  const int last_layer = model_->hparams().n_layer - 1;
  int differ = 0;
  for (int t = static_cast<int>(tokens.size()) - resumed; t < static_cast<int>(tokens.size()); ++t) {
    for (int h = 0; h < decoded.n_head_kv(); ++h) {
      const size_t bytes = decoded.head_dim() * sizeof(uint16_t);
      EXPECT_EQ(std::memcmp(decoded.KeySlot(last_layer, h, t), resumed_kv.KeySlot(last_layer, h, t), bytes), 0);
      EXPECT_EQ(std::memcmp(decoded.ValueSlot(last_layer, h, t), resumed_kv.ValueSlot(last_layer, h, t), bytes), 0);
      differ += std::memcmp(decoded.KeySlot(last_layer, h, t), prefilled.KeySlot(last_layer, h, t), bytes) != 0;
    }
  }
  EXPECT_GT(differ, 0);
}

}  // namespace
}  // namespace psa
