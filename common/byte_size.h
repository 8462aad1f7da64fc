// Byte sizes written for humans in flags: "1073741824", "512MiB", "8GiB",
// "64KiB", "2GB" (decimal units are powers of 1000, binary of 1024).
#ifndef PSA_COMMON_BYTE_SIZE_H_
#define PSA_COMMON_BYTE_SIZE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace psa {

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);
std::string FormatByteSize(uint64_t bytes);  // e.g. "1.5 GiB"

}  // namespace psa

#endif  // PSA_COMMON_BYTE_SIZE_H_
