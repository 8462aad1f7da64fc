// Helpers shared by the gguf_file_test sources: parsing and loading
// in-memory GGUF images, a small model spec, raw header bytes, and error
// expectations.
#ifndef PSA_TESTS_UNIT_GGUF_FILE_TESTING_H_
#define PSA_TESTS_UNIT_GGUF_FILE_TESTING_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa::testing {

// The first `size` bytes of `image` (default: all), named "test.gguf".
absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image,
                                                     size_t size);
absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image);

// `image` must outlive the model: Parse() does not copy.
absl::StatusOr<std::unique_ptr<LlamaModel>> LoadImage(const std::vector<uint8_t>& image);

template <typename T>
void ExpectError(const absl::StatusOr<T>& result, absl::StatusCode code,
                 const std::string& substr) {
  ASSERT_FALSE(result.ok()) << "expected an error containing '" << substr << "'";
  EXPECT_EQ(result.status().code(), code) << result.status();
  EXPECT_THAT(std::string(result.status().message()), ::testing::HasSubstr(substr));
}

// One layer, 32-wide: small enough to parse every prefix of the file.
TinyModelSpec SmallSpec();

// Little-endian bytes of a u64, and of an array value's header (element
// type, count).
std::vector<uint8_t> U64Bytes(uint64_t x);
std::vector<uint8_t> ArrayHeader(GgufType elem, uint64_t count);

// A valid minimal file that each corruption starts from.
GgufWriter MinimalWriter();

}  // namespace psa::testing

#endif  // PSA_TESTS_UNIT_GGUF_FILE_TESTING_H_
