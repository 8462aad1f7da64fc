// Model families beyond Llama 2: Qwen2 (Q/K/V biases, NeoX RoPE) and Llama
// 3.1 (RoPE frequency factors), each against the reference forward pass; and
// the refusals, naming the key, of what the runtime does not support.
#include <cmath>
#include <string>

#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"
#include "tests/unit/reference_forward.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

// Qwen2's parts: Q/K/V biases and NeoX-style RoPE; Llama 3.1's per-pair
// RoPE frequency factors. Each against the reference, which would differ by
// far more than the tolerance if a bias were dropped or a pair mismatched.
TEST(RuntimeTest, Qwen2AndLlama31RopeFactorsMatchReference) {
  for (const bool qwen : {true, false}) {
    testing::TinyModelSpec spec;
    spec.weight_type = GgmlType::kF32;
    spec.embd_type = GgmlType::kF32;
    spec.architecture = qwen ? "qwen2" : "llama";
    spec.rope_freq_factors = !qwen;
    spec.tied_output = !qwen;
    spec.seed = qwen ? 21 : 22;
    auto model = TinyModel(spec);
    ASSERT_NE(model, nullptr);
    const LlamaHparams& hp = model->hparams();
    EXPECT_EQ(hp.rope_style,
              qwen ? LlamaHparams::RopeStyle::kNeox : LlamaHparams::RopeStyle::kAdjacent);
    EXPECT_EQ(model->layer(0).bk.size(), qwen ? static_cast<size_t>(hp.n_head_kv * hp.head_dim) : 0u);
    EXPECT_EQ(hp.rope_freq_factors.size(), qwen ? 0u : static_cast<size_t>(hp.rope_dim / 2));
    const ReferenceComparison c = CompareWithReference(*model, RandomTokens(40, hp.n_vocab, 5));
    ASSERT_TRUE(c.ok);
    EXPECT_LT(c.max_err, 2e-3 * std::max(1.0, c.max_ref))
        << spec.architecture << " max_ref " << c.max_ref;
  }
}

TEST(RuntimeTest, UnsupportedArchitectureAndRopeScalingAreRefusedByName) {
  testing::TinyModelSpec spec;
  spec.architecture = "qwen3";
  auto bytes = testing::BuildTinyLlamaGguf(spec);
  auto m = LlamaModel::Load(testing::WriteTempFile(bytes, "qwen3.gguf"));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("general.architecture 'qwen3'"), std::string::npos)
      << m.status().message();
  spec.architecture = "llama";
  auto w = testing::TinyLlamaWriter(spec);
  w.AddString("llama.rope.scaling.type", "yarn");
  m = LlamaModel::Load(testing::WriteTempFile(w.Finish(), "yarn.gguf"));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("llama.rope.scaling.type = 'yarn'"), std::string::npos)
      << m.status().message();
  w = testing::TinyLlamaWriter(spec);
  w.AddU32("llama.attention.key_length", 8);
  m = LlamaModel::Load(testing::WriteTempFile(w.Finish(), "keylen.gguf"));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("llama.attention.key_length = 8"), std::string::npos)
      << m.status().message();
}

}  // namespace
}  // namespace psa
