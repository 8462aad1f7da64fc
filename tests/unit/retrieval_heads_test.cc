// Retrieval heads: naming the sites, the registry's entries, and sparse
// attention reading every block of a marked site (and only there).
#include "compute_worker/runtime/retrieval_heads.h"

#include <algorithm>
#include <vector>

#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/model/model_registry.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"
#include "tests/unit/sparse_attention_testing.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using testing::kHeadDim;
using testing::Output;
using testing::RandomCache;
using testing::RandomQuery;
using testing::TopK;

LlamaHparams Shape(int layers, int kv_heads) {
  LlamaHparams hp;
  hp.n_layer = layers;
  hp.n_head_kv = kv_heads;
  return hp;
}

TEST(RetrievalHeadsTest, SitesParseAndWhatTheModelLacksIsRefused) {
  const LlamaHparams hp = Shape(30, 3);
  auto mask = ParseRetrievalHeads(" L7.2, l17.1 ", hp);
  ASSERT_TRUE(mask.ok()) << mask.status();
  ASSERT_EQ(mask->size(), 90u);
  EXPECT_EQ(std::count(mask->begin(), mask->end(), true), 2);
  EXPECT_TRUE((*mask)[7 * 3 + 2]);
  EXPECT_TRUE((*mask)[17 * 3 + 1]);
  for (const char* none : {"", "none", "-"}) {
    auto empty = ParseRetrievalHeads(none, hp);
    ASSERT_TRUE(empty.ok());
    EXPECT_TRUE(empty->empty()) << none;
  }
  for (const char* bad : {"7.2", "L7", "L7.2.1", "Lx.1", "L7.2,M1.0"}) {
    auto r = ParseRetrievalHeads(bad, hp);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find("L<layer>.<KV head>"), std::string::npos)
        << r.status().message();
  }
  for (const char* outside : {"L30.0", "L0.3", "L-1.0"}) {
    auto r = ParseRetrievalHeads(outside, hp);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << outside;
    EXPECT_NE(r.status().message().find("30 layers, 3 KV heads"), std::string::npos)
        << r.status().message();
  }
}

TEST(RetrievalHeadsTest, TheRegistryNamesTheSitesOfTheFileItKnows) {
  const RegisteredModel& smollm2 = ModelRegistry().front();
  ASSERT_EQ(smollm2.name, "smollm2-135m");
  ASSERT_FALSE(smollm2.retrieval_heads.empty());
  const LlamaHparams hp = Shape(30, 3);  // SmolLM2-135M's
  std::string described;
  auto mask = ResolveRetrievalHeads("registry", smollm2.sha256, hp, &described);
  ASSERT_TRUE(mask.ok()) << mask.status();
  EXPECT_EQ(*mask, *ParseRetrievalHeads(smollm2.retrieval_heads, hp));
  EXPECT_TRUE((*mask)[7 * 3 + 2]);
  EXPECT_NE(described.find("L7.2"), std::string::npos) << described;
  EXPECT_NE(described.find("registry: smollm2-135m"), std::string::npos) << described;

  // A file the registry does not know has none; a list overrides the registry.
  auto unknown = ResolveRetrievalHeads("registry", std::string(64, '0'), hp, &described);
  ASSERT_TRUE(unknown.ok());
  EXPECT_TRUE(unknown->empty());
  EXPECT_EQ(described, "none (registry: not registered)");
  auto given = ResolveRetrievalHeads("L0.0", smollm2.sha256, hp, &described);
  ASSERT_TRUE(given.ok());
  EXPECT_EQ(std::count(given->begin(), given->end(), true), 1);
  EXPECT_EQ(described, "L0.0 (--retrieval_heads)");
  auto none = ResolveRetrievalHeads("none", smollm2.sha256, hp);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  // The registry's entry must fit the model it names.
  auto misfit = ResolveRetrievalHeads("registry", smollm2.sha256, Shape(4, 2));
  ASSERT_EQ(misfit.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(misfit.status().message().find("registry: smollm2-135m"), std::string::npos);
}

// One decode row of KV head 1, the task marked or not.
Output Step(const AttentionBackend& backend, const AttentionShape& shape, KvCache& kv,
            const std::vector<float>& q, bool retrieval_head) {
  return testing::Attend(backend, shape, kv, q, 1, retrieval_head);
}

TEST(RetrievalHeadsTest, AMarkedSiteReadsEveryBlockAsDenseDoes) {
  const AttentionShape shape{6, 2, kHeadDim, 0.125f};
  KvCache kv = RandomCache(2, 1000, 16, 77);
  const std::vector<float> q = RandomQuery(3, 1000);
  const Output dense = Step(DenseAttention(), shape, kv, q, false);
  AttentionPolicy topk = TopK(4), psa;
  psa.kind = AttentionPolicy::Kind::kPsa;
  for (const AttentionPolicy& p : {topk, psa}) {
    const Output marked = Step(SparseAttention(p), shape, kv, q, true);
    EXPECT_EQ(marked.out, dense.out) << p.ToString();  // the dense kernel itself
    for (const HeadStepStats& s : marked.stats) EXPECT_EQ(s.blocks_touched, s.blocks_total);
    // Unmarked, or with the policy's "noretrieval", it selects.
    AttentionPolicy off = p;
    off.retrieval_dense = false;
    for (const Output& o : {Step(SparseAttention(p), shape, kv, q, false),
                            Step(SparseAttention(off), shape, kv, q, true)}) {
      EXPECT_NE(o.out, dense.out) << p.ToString();
      EXPECT_LT(o.stats[0].blocks_touched, o.stats[0].blocks_total) << p.ToString();
    }
  }
}

TEST(RetrievalHeadsTest, TheRuntimeMarksTheSitesItIsGivenAndNoOthers) {
  auto model = LlamaModel::Load(
      testing::WriteTempFile(testing::BuildTinyLlamaGguf(testing::TinyModelSpec{}), "rh.gguf"));
  ASSERT_TRUE(model.ok());
  const LlamaHparams& hp = (*model)->hparams();  // 2 layers, 4 heads, 2 KV heads
  LlamaRuntime dense_rt(**model, RuntimeOptions{});
  LlamaRuntime rt(**model, RuntimeOptions{}, MakeAttention(TopK(2)));
  EXPECT_EQ(rt.SetRetrievalHeads(std::vector<bool>(3, true)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(rt.retrieval_heads().empty());

  GenerationRequest req;
  req.prompt.resize(90);
  for (int i = 0; i < 90; ++i) req.prompt[i] = (i * 37 + 11) % hp.n_vocab;
  req.max_tokens = 16;
  req.ignore_eos = true;
  auto dense = Generate(dense_rt, req);
  ASSERT_TRUE(dense.ok());
  auto sparse = Generate(rt, req);
  ASSERT_TRUE(sparse.ok());
  EXPECT_LT(sparse->kv_blocks_touched, sparse->kv_blocks_total);
  // Every site marked: top-k 2 decodes exactly as dense does.
  ASSERT_TRUE(rt.SetRetrievalHeads(*ParseRetrievalHeads("L0.0,L0.1,L1.0,L1.1", hp)).ok());
  auto all = Generate(rt, req);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->tokens, dense->tokens);
  EXPECT_EQ(all->kv_blocks_touched, all->kv_blocks_total);

  // One site marked: its query heads read everything, the others select.
  ASSERT_TRUE(rt.SetRetrievalHeads(*ParseRetrievalHeads("L1.0", hp)).ok());
  KvCache kv = rt.NewCache();
  std::vector<float> logits;
  ASSERT_TRUE(rt.Prefill(&kv, req.prompt, &logits).ok());
  const TokenId t = 5;
  std::vector<HeadStepStats> stats;
  const BatchEntry e{&kv, {&t, 1}, true, nullptr, &stats};
  ASSERT_TRUE(rt.Forward({&e, 1}, &logits).ok());
  const int group = hp.n_head / hp.n_head_kv;
  for (int l = 0; l < hp.n_layer; ++l) {
    for (int head = 0; head < hp.n_head; ++head) {
      const HeadStepStats& s = stats[static_cast<size_t>(l) * hp.n_head + head];
      if (l == 1 && head / group == 0) {
        EXPECT_EQ(s.blocks_touched, s.blocks_total) << "L" << l << " head " << head;
      } else {
        EXPECT_LT(s.blocks_touched, s.blocks_total) << "L" << l << " head " << head;
      }
    }
  }
}

}  // namespace
}  // namespace psa
