// GgufFile parsing and validation, and LlamaModel's checks on top of it, on
// in-memory images from tiny_gguf.h: valid files, every truncation, targeted
// corruptions and a seeded random mutation sweep.
#include "compute_worker/model/gguf_file.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "compute_worker/model/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa::testing {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image,
                                                     size_t size) {
  return GgufFile::Parse(image.data(), size, "test.gguf");
}
absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image) {
  return ParseImage(image, image.size());
}

// `image` must outlive the model: Parse() does not copy.
absl::StatusOr<std::unique_ptr<LlamaModel>> LoadImage(const std::vector<uint8_t>& image) {
  auto file = ParseImage(image);
  if (!file.ok()) return file.status();
  return LlamaModel::FromGguf(std::move(*file));
}

template <typename T>
void ExpectError(const absl::StatusOr<T>& result, absl::StatusCode code,
                 const std::string& substr) {
  ASSERT_FALSE(result.ok()) << "expected an error containing '" << substr << "'";
  EXPECT_EQ(result.status().code(), code) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(substr));
}

// One layer, 32-wide: small enough to parse every prefix of the file.
TinyModelSpec SmallSpec() {
  TinyModelSpec spec;
  spec.n_layer = 1;
  spec.n_embd = 32;
  spec.n_head = 2;
  spec.n_head_kv = 1;
  spec.n_ff = 32;
  return spec;
}

std::vector<uint8_t> U64Bytes(uint64_t x) {
  std::vector<uint8_t> b(8);
  std::memcpy(b.data(), &x, 8);
  return b;
}

std::vector<uint8_t> ArrayHeader(GgufType elem, uint64_t count) {
  std::vector<uint8_t> b(12);
  const uint32_t e = static_cast<uint32_t>(elem);
  std::memcpy(b.data(), &e, 4);
  std::memcpy(b.data() + 4, &count, 8);
  return b;
}

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

// Parses prefixes of `image` (every `step`-th length) and expects each to fail
// with a message that says the file is truncated.
void ExpectTruncationsRejected(const std::vector<uint8_t>& image, size_t step) {
  int failures = 0;
  for (size_t len = 0; len < image.size() && failures < 5; len += step) {
    auto file = ParseImage(image, len);
    if (file.ok()) {
      ADD_FAILURE() << "prefix of " << len << " bytes parsed";
      ++failures;
    } else if (file.status().code() != absl::StatusCode::kInvalidArgument ||
               !absl::StrContains(file.status().message(), "truncated")) {
      ADD_FAILURE() << "prefix of " << len << " bytes: " << file.status();
      ++failures;
    }
  }
}

TEST(GgufFileTest, EveryTruncationIsRejected) {
  const std::vector<uint8_t> image = BuildTinyLlamaGguf(SmallSpec());
  ExpectTruncationsRejected(image, 1);
  ASSERT_TRUE(ParseImage(image).ok());
}

TEST(GgufFileTest, SampledTruncationsOfLargerModelAreRejected) {
  TinyModelSpec spec;
  spec.tokenizer = "llama";
  spec.tied_output = false;
  const std::vector<uint8_t> image = TinyLlamaWriter(spec).Finish(2, 64);
  ExpectTruncationsRejected(image, 7);
  ASSERT_TRUE(ParseImage(image).ok());
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

// A valid minimal file that each corruption starts from.
GgufWriter MinimalWriter() {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddTensor("t", GgmlType::kF32, {32}, std::vector<uint8_t>(128));
  return w;
}

std::vector<uint8_t> Patch(std::vector<uint8_t> image, size_t at, std::vector<uint8_t> bytes) {
  std::copy(bytes.begin(), bytes.end(), image.begin() + at);
  return image;
}

struct Corruption {
  std::string name;
  std::function<std::vector<uint8_t>()> make;
  std::string message;  // expected in the INVALID_ARGUMENT message
};

// Keeps ctest's discovered test names readable and stable (gtest would
// otherwise print the struct's bytes, pointers included).
void PrintTo(const Corruption& c, std::ostream* os) { *os << c.name; }

std::vector<Corruption> Corruptions() {
  using T = GgufType;
  // Header layout: magic @0, version @4, tensor count @8, kv count @16,
  // first key length @24.
  auto with = [](std::function<void(GgufWriter&)> edit) {
    return [edit] {
      GgufWriter w = MinimalWriter();
      edit(w);
      return w.Finish();
    };
  };
  auto info = [](uint32_t type, std::vector<uint64_t> dims, uint64_t offset) {
    return [=](GgufWriter& w) { w.AddTensorInfo("bad", type, dims, offset); };
  };
  return {
      {"BadMagic",
       [] {
         return Patch(MinimalWriter().Finish(), 0, {'G', 'G', 'M', 'L'});
       },
       "bad magic"},
      {"Version1", [] { return MinimalWriter().Finish(1); }, "unsupported GGUF version 1"},
      {"Version4", [] { return MinimalWriter().Finish(4); }, "unsupported GGUF version 4"},
      {"ImplausibleKvCount",
       [] { return Patch(MinimalWriter().Finish(), 16, U64Bytes(1ull << 50)); },
       "implausible counts"},
      {"ImplausibleTensorCount",
       [] { return Patch(MinimalWriter().Finish(), 8, U64Bytes(1ull << 50)); },
       "implausible counts"},
      {"HugeKeyLength", [] { return Patch(MinimalWriter().Finish(), 24, U64Bytes(1ull << 40)); },
       "string length 1099511627776"},
      {"UnknownMetadataType", with([](GgufWriter& w) { w.AddRaw("x", 13, {}); }),
       "'x' has unknown value type 13"},
      {"BoolOutOfRange",
       with([](GgufWriter& w) { w.AddRaw("x", static_cast<uint32_t>(T::kBool), {2}); }),
       "bool value 2"},
      {"HugeStringLength", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kString), U64Bytes(1ull << 40));
       }),
       "string length 1099511627776"},
      {"HugeArrayCount", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kArray), ArrayHeader(T::kU8, 1ull << 40));
       }),
       "array length 1099511627776 is implausible"},
      {"StringArrayCountExceedsFile", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kArray), ArrayHeader(T::kString, 1ull << 29));
       }),
       "cannot fit"},
      {"NumericArrayPastEnd", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kArray), ArrayHeader(T::kF32, 1ull << 20));
       }),
       "truncated"},
      {"NestedArray", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kArray), ArrayHeader(T::kArray, 0));
       }),
       "unsupported array element type 9"},
      {"UnknownArrayType", with([](GgufWriter& w) {
         w.AddRaw("x", static_cast<uint32_t>(T::kArray), ArrayHeader(static_cast<T>(13), 0));
       }),
       "unsupported array element type 13"},
      {"DuplicateKey", with([](GgufWriter& w) {
         w.AddU32("a", 1);
         w.AddU32("a", 2);
       }),
       "duplicate metadata key 'a'"},
      {"AlignmentNotPowerOfTwo", with([](GgufWriter& w) { w.AddU32("general.alignment", 48); }),
       "power of two"},
      {"AlignmentNotInteger", with([](GgufWriter& w) { w.AddF32("general.alignment", 32); }),
       "power of two"},
      {"UnsupportedTensorTypeQ4K", with(info(12, {256}, 0)), "ggml type 12"},
      {"Q8_1IsNotAWeightType", with(info(9, {32}, 0)), "ggml type 9"},
      {"MisalignedOffset", with(info(0, {8}, 4)), "offset 4 is not aligned to 32"},
      {"TensorPastEnd", with(info(0, {48}, 0)), "extends past the end of the file"},
      {"TensorLargerThanFile", with(info(0, {1024}, 0)), "is larger than the file"},
      {"OffsetPastEnd", with(info(0, {8}, 1ull << 40)), "extends past the end of the file"},
      {"Rank0", with(info(0, {}, 0)), "rank 0"},
      {"Rank5", with(info(0, {1, 1, 1, 1, 1}, 0)), "rank 5"},
      {"ZeroDimension", with(info(0, {32, 0}, 0)), "invalid dimension 0"},
      {"HugeDimension", with(info(0, {1ull << 41}, 0)), "invalid dimension 2199023255552"},
      {"ElementCountOverflow", with(info(0, {1ull << 40, 1ull << 40}, 0)), "invalid dimension"},
      // 2^62 F32 elements are 2^64 bytes: the size must not wrap to 0.
      {"ByteSizeOverflow", with(info(0, {1ull << 40, 1ull << 22}, 0)), "larger than the file"},
      {"RowNotMultipleOfBlock", with(info(2, {48, 2}, 0)),
       "row length 48 is not a multiple of Q4_0's block size"},
      {"DuplicateTensorName", with([](GgufWriter& w) {
         w.AddTensor("t", GgmlType::kF32, {32}, std::vector<uint8_t>(128));
       }),
       "duplicate tensor name 't'"},
  };
}

class GgufCorruptionTest : public ::testing::TestWithParam<Corruption> {};

TEST_P(GgufCorruptionTest, IsRejectedWithClearMessage) {
  const std::vector<uint8_t> image = GetParam().make();
  ExpectError(ParseImage(image), absl::StatusCode::kInvalidArgument, GetParam().message);
}

INSTANTIATE_TEST_SUITE_P(All, GgufCorruptionTest, ::testing::ValuesIn(Corruptions()),
                         [](const auto& info) { return info.param.name; });

TEST(GgufFileTest, MinimalWriterIsValid) {
  const std::vector<uint8_t> image = MinimalWriter().Finish();
  ASSERT_TRUE(ParseImage(image).ok());
  ExpectError(LoadImage(image), absl::StatusCode::kNotFound, "llama.block_count");
}

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
                 w.AddString("general.architecture", "qwen2");
               }),
               absl::StatusCode::kInvalidArgument, "architecture 'qwen2' is not supported");
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

// Random byte edits in the header, metadata and tensor descriptors: whatever
// the parser accepts must be internally consistent, and nothing may crash.
TEST(GgufFileTest, RandomMutationsNeverCrash) {
  for (const char* tokenizer : {"gpt2", "llama"}) {
    TinyModelSpec spec = SmallSpec();
    spec.tokenizer = tokenizer;
    const std::vector<uint8_t> image = BuildTinyLlamaGguf(spec);
    size_t header_end = image.size();
    {
      auto file = ParseImage(image);
      ASSERT_TRUE(file.ok()) << file.status();
      for (const GgufTensorInfo& t : (*file)->tensors()) {
        header_end = std::min<size_t>(header_end, t.data - image.data());
      }
    }
    std::mt19937 rng(20240611);
    int parsed = 0, loaded = 0;
    for (int iter = 0; iter < 1500; ++iter) {
      std::vector<uint8_t> mutated = image;
      for (int edits = 1 + rng() % 4; edits > 0; --edits) {
        const size_t at = rng() % header_end;
        switch (rng() % 4) {
          case 0:
            mutated[at] ^= 1u << (rng() % 8);
            break;
          case 1:
            mutated[at] = static_cast<uint8_t>(rng());
            break;
          case 2:
            mutated[at] = rng() % 2 ? 0x00 : 0xFF;
            break;
          default: {  // a random 64-bit value: hits lengths, counts, dims
            const uint64_t x = (static_cast<uint64_t>(rng()) << 32) | rng();
            std::memcpy(&mutated[at], &x, std::min<size_t>(8, mutated.size() - at));
          }
        }
      }
      auto file = ParseImage(mutated);
      if (!file.ok()) continue;
      ++parsed;
      for (const GgufTensorInfo& t : (*file)->tensors()) {
        ASSERT_GE(t.data, mutated.data());
        ASSERT_LE(t.data + t.n_bytes, mutated.data() + mutated.size());
      }
      auto model = LlamaModel::FromGguf(std::move(*file));
      if (!model.ok()) continue;
      ++loaded;
      const Tokenizer& tok = (*model)->tokenizer();
      tok.Encode("<s>in the water! <|im_end|>", true, true);
      std::vector<TokenId> all(tok.vocab_size());
      for (int i = 0; i < tok.vocab_size(); ++i) all[i] = i;
      tok.Decode(all, /*render_special=*/true);
    }
    // Mutations land in strings often enough that some files still load.
    EXPECT_GT(parsed, 0) << tokenizer;
    EXPECT_GT(loaded, 0) << tokenizer;
  }
}

}  // namespace
}  // namespace psa::testing
