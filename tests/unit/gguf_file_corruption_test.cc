// Malformed GGUF images: every truncation, targeted corruptions with the
// message each must give, and a seeded random mutation sweep.
#include <algorithm>
#include <cstring>
#include <functional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/llama_model.h"
#include "gtest/gtest.h"
#include "tests/unit/gguf_file_testing.h"
#include "tests/unit/tiny_gguf.h"

namespace psa::testing {
namespace {

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
      {"UnsupportedTensorTypeQ2K", with(info(10, {256}, 0)), "ggml type 10"},
      {"Q8_1IsNotAWeightType", with(info(9, {32}, 0)), "ggml type 9"},
      {"Q8_KIsNotAWeightType", with(info(15, {256}, 0)), "ggml type 15"},
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
      // K-quant rows are 256-element super-blocks: Qwen2.5-0.5B's 896-wide
      // rows cannot be Q4_K (its converter falls back to Q5_0 / Q8_0).
      {"Q4KRowNotMultipleOf256", with(info(12, {896, 2}, 0)),
       "tensor 'bad' row length 896 is not a multiple of Q4_K's block size (256 elements)"},
      {"Q6KTensorLargerThanFile", with(info(14, {256, 1 << 20}, 0)), "is larger than the file"},
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
