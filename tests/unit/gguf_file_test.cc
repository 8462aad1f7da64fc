// GgufFile parsing and validation on valid in-memory images from
// tiny_gguf.h: metadata, tensors, versions, model variants and file errors.
// Malformed files are in gguf_file_corruption_test.cc, LlamaModel's checks
// in gguf_file_model_test.cc.
#include "compute_worker/model/gguf_file.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "compute_worker/model/llama_model.h"
#include "gtest/gtest.h"
#include "tests/unit/gguf_file_testing.h"
#include "tests/unit/tiny_gguf.h"

namespace psa::testing {
namespace {

TEST(GgufFileTest, ParsesTinyModel) {
  const std::vector<uint8_t> image = BuildTinyLlamaGguf({});
  auto file = ParseImage(image);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;

  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.name(), "test.gguf");
  EXPECT_EQ(*f.GetString("general.architecture"), "llama");
  EXPECT_EQ(*f.GetInt("llama.block_count"), 2);
  EXPECT_EQ(*f.GetInt("llama.attention.head_count_kv"), 2);
  EXPECT_EQ(*f.GetFloat("llama.rope.freq_base"), 10000.0);
  EXPECT_FLOAT_EQ(static_cast<float>(*f.GetFloat("llama.attention.layer_norm_rms_epsilon")), 1e-5f);
  EXPECT_FALSE(*f.GetBool("tokenizer.ggml.add_bos_token"));

  auto tokens = f.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ((*tokens)->size(), 270u);
  EXPECT_EQ((**tokens)['!'], "!");
  EXPECT_EQ((**tokens)[' '], "Ġ");  // GPT-2 byte-level space, U+0120
  EXPECT_EQ((**tokens)[269], "<|im_end|>");
  auto types = f.GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(types.ok()) << types.status();
  EXPECT_EQ(types->size(), 270u);
  EXPECT_EQ(types->back(), 3);
  EXPECT_EQ(*f.GetInt("tokenizer.ggml.eos_token_id"), 269);

  // token_embd + 9 per layer + output_norm; the output is tied.
  EXPECT_EQ(f.tensors().size(), 1u + 2 * 9 + 1);
  EXPECT_EQ(f.FindTensor("output.weight"), nullptr);
  EXPECT_EQ(f.FindTensor("nope"), nullptr);
  EXPECT_EQ(f.Find("nope"), nullptr);

  const GgufTensorInfo* down = f.FindTensor("blk.1.ffn_down.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->type, GgmlType::kQ4_1);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{96, 64}));
  EXPECT_EQ(down->rows(), 64);
  EXPECT_EQ(down->n_elements(), 96 * 64);
  EXPECT_EQ(down->n_bytes, 64u * 3 * sizeof(BlockQ4_1));
  for (const GgufTensorInfo& t : f.tensors()) {
    const size_t at = t.data - image.data();
    EXPECT_EQ(at % 32, 0u) << t.name;
    EXPECT_LE(at + t.n_bytes, image.size()) << t.name;
  }

  const GgufTensorInfo* norm = f.FindTensor("output_norm.weight");
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(norm->type, GgmlType::kF32);
  std::vector<float> gain(64);
  std::memcpy(gain.data(), norm->data, norm->n_bytes);
  for (float g : gain) EXPECT_NEAR(g, 1.0f, 0.05f);
}

TEST(GgufFileTest, TypedAccessors) {
  GgufWriter w;
  w.AddString("s", "text");
  w.AddU32("u32", 7);
  w.AddI32("i32", -5);
  w.AddU64("u64", 1ull << 40);
  w.AddU64("u64_huge", (1ull << 63) + 1);
  w.AddF32("f32", 0.5f);
  w.AddBool("bool", true);
  w.AddStringArray("strs", {"a", "", "c"});
  w.AddI32Array("ints", {1, -2, 3});
  w.AddF32Array("floats", {0.25f, -1.5f});
  w.AddI32Array("empty", {});
  const std::vector<uint8_t> image = w.Finish();
  auto file = ParseImage(image);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  constexpr auto kWrong = absl::StatusCode::kInvalidArgument;

  EXPECT_EQ(*f.GetString("s"), "text");
  EXPECT_EQ(*f.GetInt("u32"), 7);
  EXPECT_EQ(*f.GetInt("i32"), -5);
  EXPECT_EQ(*f.GetInt("u64"), int64_t{1} << 40);
  EXPECT_EQ(*f.GetFloat("f32"), 0.5);
  EXPECT_TRUE(*f.GetBool("bool"));
  EXPECT_EQ(**f.GetStringArray("strs"), (std::vector<std::string>{"a", "", "c"}));
  EXPECT_EQ(*f.GetIntArray("ints"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(*f.GetFloatArray("ints"), (std::vector<float>{1, -2, 3}));
  EXPECT_EQ(*f.GetFloatArray("floats"), (std::vector<float>{0.25f, -1.5f}));
  EXPECT_TRUE(f.GetIntArray("empty")->empty());

  ExpectError(f.GetString("u32"), kWrong, "'u32' is not a string");
  ExpectError(f.GetInt("s"), kWrong, "'s' is not an integer");
  ExpectError(f.GetInt("f32"), kWrong, "not an integer");
  ExpectError(f.GetInt("bool"), kWrong, "not an integer");
  ExpectError(f.GetInt("ints"), kWrong, "not an integer");
  ExpectError(f.GetInt("u64_huge"), kWrong, "not an integer");
  ExpectError(f.GetFloat("u32"), kWrong, "'u32' is not a float");
  ExpectError(f.GetBool("u32"), kWrong, "'u32' is not a bool");
  ExpectError(f.GetIntArray("u32"), kWrong, "not a numeric array");
  ExpectError(f.GetIntArray("strs"), kWrong, "not a numeric array");
  ExpectError(f.GetFloatArray("s"), kWrong, "not a numeric array");
  ExpectError(f.GetStringArray("ints"), kWrong, "not a string array");
  ExpectError(f.GetStringArray("s"), kWrong, "not a string array");
  ExpectError(f.GetString("missing"), absl::StatusCode::kNotFound, "'missing' is missing");
  ExpectError(f.GetInt("missing"), absl::StatusCode::kNotFound, "missing");
  ExpectError(f.GetFloatArray("missing"), absl::StatusCode::kNotFound, "missing");
  ExpectError(f.GetStringArray("missing"), absl::StatusCode::kNotFound, "missing");
}

class GgufVersionTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(GgufVersionTest, LoadsThroughLlamaModel) {
  const std::vector<uint8_t> image = TinyLlamaWriter({}).Finish(GetParam());
  auto file = ParseImage(image);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->version(), GetParam());

  auto model = LlamaModel::FromGguf(std::move(*file));
  ASSERT_TRUE(model.ok()) << model.status();
  const LlamaHparams& hp = (*model)->hparams();
  EXPECT_EQ(hp.architecture, "llama");
  EXPECT_EQ(hp.n_layer, 2);
  EXPECT_EQ(hp.n_embd, 64);
  EXPECT_EQ(hp.n_head, 4);
  EXPECT_EQ(hp.n_head_kv, 2);
  EXPECT_EQ(hp.head_dim, 16);
  EXPECT_EQ(hp.rope_dim, 16);
  EXPECT_EQ(hp.n_ff, 96);
  EXPECT_EQ(hp.n_vocab, 270);
  EXPECT_EQ(hp.n_ctx_train, 256);
  EXPECT_EQ(hp.rope_base, 10000.0f);
  EXPECT_TRUE(hp.tied_output);
  EXPECT_EQ((*model)->token_embd().type, GgmlType::kQ8_0);
  EXPECT_EQ((*model)->token_embd().rows, 270);
  EXPECT_EQ((*model)->output().data, (*model)->token_embd().data);
  EXPECT_EQ((*model)->layer(1).wk.rows, 32);
  EXPECT_EQ((*model)->layer(1).wk.row_bytes, 2 * sizeof(BlockQ4_1));
  EXPECT_EQ((*model)->layer(0).attn_norm.size(), 64u);

  // The same image through the file path (mmap).
  const std::string path = WriteTempFile(image, "tiny.gguf");
  auto loaded = LlamaModel::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->file().name(), path);
  EXPECT_EQ((*loaded)->file().version(), GetParam());
  EXPECT_EQ((*loaded)->layer(1).ffn_norm, (*model)->layer(1).ffn_norm);
}

INSTANTIATE_TEST_SUITE_P(Versions, GgufVersionTest, ::testing::Values(2u, 3u),
                         [](const auto& info) { return "V" + std::to_string(info.param); });

TEST(GgufFileTest, LoadsModelVariants) {
  struct Variant {
    GgmlType weights, embd;
    bool tied;
    std::string tokenizer;
  };
  const Variant variants[] = {
      {GgmlType::kQ4_0, GgmlType::kQ4_0, false, "llama"},
      {GgmlType::kQ8_0, GgmlType::kF16, true, "gpt2"},
      {GgmlType::kF16, GgmlType::kF32, false, "gpt2"},
      {GgmlType::kBF16, GgmlType::kBF16, true, "llama"},
      {GgmlType::kF32, GgmlType::kQ4_1, false, "llama"},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE(std::string(TypeName(v.weights)) + " " + v.tokenizer);
    TinyModelSpec spec = SmallSpec();
    spec.weight_type = v.weights;
    spec.embd_type = v.embd;
    spec.tied_output = v.tied;
    spec.tokenizer = v.tokenizer;
    spec.rope_base = 500000.0f;
    const std::vector<uint8_t> image = BuildTinyLlamaGguf(spec);
    auto model = LoadImage(image);
    ASSERT_TRUE(model.ok()) << model.status();
    const LlamaModel& m = **model;
    EXPECT_EQ(m.hparams().tied_output, v.tied);
    EXPECT_EQ(m.hparams().rope_base, 500000.0f);
    EXPECT_EQ(m.layer(0).w_down.type, v.weights);
    EXPECT_EQ(m.token_embd().type, v.embd);
    EXPECT_EQ(m.output().type, v.tied ? v.embd : v.weights);

    // The tiny vocabularies really tokenise: merges / scores are consistent.
    const Tokenizer& tok = m.tokenizer();
    if (v.tokenizer == "gpt2") {
      EXPECT_EQ(m.chat_template().style(), ChatTemplate::Style::kChatMl);
      EXPECT_FALSE(tok.add_bos_default());
      EXPECT_EQ(tok.Encode(" the", false, false), (std::vector<TokenId>{tok.Lookup("Ġthe")}));
      EXPECT_EQ(tok.Encode("<|im_end|>", false, true), (std::vector<TokenId>{tok.eos_id()}));
      EXPECT_TRUE(tok.IsEndOfGeneration(tok.eos_id()));
      EXPECT_EQ(tok.Decode(tok.Encode("in the water!", false, false)), "in the water!");
    } else {
      EXPECT_EQ(m.chat_template().style(), ChatTemplate::Style::kLlama2);
      EXPECT_TRUE(tok.add_bos_default());
      EXPECT_EQ(tok.bos_id(), 1);
      EXPECT_EQ(tok.eos_id(), 2);
      EXPECT_EQ(tok.Encode("the", true, false), (std::vector<TokenId>{1, tok.Lookup("▁the")}));
      EXPECT_EQ(tok.Decode(tok.Encode("in the water!", false, false)), "in the water!");
    }
  }
}

TEST(GgufFileTest, NonDefaultAlignment) {
  const std::vector<uint8_t> image = TinyLlamaWriter(SmallSpec()).Finish(3, 64);
  auto file = ParseImage(image);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(*(*file)->GetInt("general.alignment"), 64);
  for (const GgufTensorInfo& t : (*file)->tensors()) {
    EXPECT_EQ(t.offset % 64, 0u) << t.name;
    EXPECT_EQ((t.data - image.data()) % 64, 0) << t.name;
  }
  EXPECT_TRUE(LlamaModel::FromGguf(std::move(*file)).ok());

  // The default alignment is implied, not written.
  auto plain = ParseImage(BuildTinyLlamaGguf(SmallSpec()));
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->Find("general.alignment"), nullptr);
}

TEST(GgufFileTest, OpenReportsFileErrors) {
  const std::string missing = WriteTempFile({}, "placeholder") + ".does-not-exist";
  ExpectError(GgufFile::Open(missing), absl::StatusCode::kNotFound, missing);
  ExpectError(LlamaModel::Load(missing), absl::StatusCode::kNotFound, missing);

  ExpectError(GgufFile::Open(WriteTempFile({}, "empty.gguf")), absl::StatusCode::kInvalidArgument,
              "file is empty");

  const std::string dir = missing.substr(0, missing.rfind('/'));
  ExpectError(GgufFile::Open(dir), absl::StatusCode::kInvalidArgument, "not a regular file");

  std::vector<uint8_t> image = BuildTinyLlamaGguf(SmallSpec());
  image.resize(image.size() / 3);
  const std::string truncated = WriteTempFile(image, "truncated.gguf");
  ExpectError(GgufFile::Open(truncated), absl::StatusCode::kInvalidArgument, truncated);
  ExpectError(GgufFile::Open(truncated), absl::StatusCode::kInvalidArgument, "truncated");
}

TEST(GgufFileTest, MinimalWriterIsValid) {
  const std::vector<uint8_t> image = MinimalWriter().Finish();
  ASSERT_TRUE(ParseImage(image).ok());
  ExpectError(LoadImage(image), absl::StatusCode::kNotFound, "llama.block_count");
}

}  // namespace
}  // namespace psa::testing
