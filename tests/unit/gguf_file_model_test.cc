// LlamaModel::FromGguf's checks on top of a parsed GGUF file: missing or
// misshapen tensors and missing, mistyped or inconsistent metadata.
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/gguf_file_testing.h"
#include "tests/unit/tiny_gguf.h"

namespace psa::testing {
namespace {

using ::testing::HasSubstr;

// LlamaModel::FromGguf on a tiny model with one edit.
absl::Status LoadEdited(const std::function<void(GgufWriter&)>& edit) {
  GgufWriter w = TinyLlamaWriter({});
  edit(w);
  const std::vector<uint8_t> image = w.Finish();
  return LoadImage(image).status();
}

void ExpectStatus(const absl::Status& s, absl::StatusCode code, const std::string& substr) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(substr));
}

TEST(LlamaModelFromGgufTest, MissingTensor) {
  ExpectStatus(
      LoadEdited([](GgufWriter& w) { ASSERT_TRUE(w.RemoveTensor("blk.1.ffn_down.weight")); }),
      absl::StatusCode::kNotFound, "tensor 'blk.1.ffn_down.weight' is missing");
  ExpectStatus(LoadEdited([](GgufWriter& w) { ASSERT_TRUE(w.RemoveTensor("output_norm.weight")); }),
               absl::StatusCode::kNotFound, "output_norm.weight");
}

TEST(LlamaModelFromGgufTest, WrongShape) {
  ExpectStatus(LoadEdited([](GgufWriter& w) {
                 ASSERT_TRUE(w.RemoveTensor("blk.0.attn_k.weight"));
                 w.AddTensor("blk.0.attn_k.weight", GgmlType::kQ8_0, {64, 64},
                             std::vector<uint8_t>(64 * 2 * sizeof(BlockQ8_0)));
               }),
               absl::StatusCode::kInvalidArgument,
               "tensor 'blk.0.attn_k.weight' has shape [64 x 64], expected [64 x 32]");
  ExpectStatus(LoadEdited([](GgufWriter& w) {
                 ASSERT_TRUE(w.RemoveTensor("blk.1.attn_norm.weight"));
                 w.AddTensor("blk.1.attn_norm.weight", GgmlType::kF32, {32, 2},
                             std::vector<uint8_t>(64 * 4));
               }),
               absl::StatusCode::kInvalidArgument, "expected [64]");
}

TEST(LlamaModelFromGgufTest, ArchitectureNotLlama) {
  ExpectStatus(LoadEdited([](GgufWriter& w) {
                 ASSERT_TRUE(w.RemoveKey("general.architecture"));
                 w.AddString("general.architecture", "gemma2");
               }),
               absl::StatusCode::kInvalidArgument, "architecture 'gemma2' is not supported");
}

TEST(LlamaModelFromGgufTest, InconsistentHeadCounts) {
  auto set = [](const std::string& key, uint32_t value) {
    return [=](GgufWriter& w) {
      ASSERT_TRUE(w.RemoveKey(key));
      w.AddU32(key, value);
    };
  };
  ExpectStatus(LoadEdited(set("llama.attention.head_count_kv", 3)),
               absl::StatusCode::kInvalidArgument, "inconsistent heads");
  ExpectStatus(LoadEdited(set("llama.attention.head_count", 5)), absl::StatusCode::kInvalidArgument,
               "inconsistent heads");
  ExpectStatus(LoadEdited(set("llama.attention.head_count_kv", 8)),
               absl::StatusCode::kInvalidArgument, "head_count_kv = 8 is out of range");
  ExpectStatus(LoadEdited(set("llama.block_count", 0)), absl::StatusCode::kInvalidArgument,
               "block_count = 0 is out of range");
}

TEST(LlamaModelFromGgufTest, MissingOrMistypedMetadata) {
  ExpectStatus(LoadEdited([](GgufWriter& w) { ASSERT_TRUE(w.RemoveKey("llama.block_count")); }),
               absl::StatusCode::kNotFound, "llama.block_count");
  ExpectStatus(LoadEdited([](GgufWriter& w) {
                 ASSERT_TRUE(w.RemoveKey("llama.embedding_length"));
                 w.AddString("llama.embedding_length", "64");
               }),
               absl::StatusCode::kInvalidArgument, "'llama.embedding_length' is not an integer");
  ExpectStatus(LoadEdited([](GgufWriter& w) { ASSERT_TRUE(w.RemoveKey("tokenizer.ggml.model")); }),
               absl::StatusCode::kNotFound, "tokenizer.ggml.model");
}

}  // namespace
}  // namespace psa::testing
