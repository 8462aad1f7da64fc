// SHA-256 of a file (OpenSSL), as lowercase hex: identifies model weights.
#ifndef PSA_COMMON_SHA256_H_
#define PSA_COMMON_SHA256_H_

#include <string>

#include "absl/status/statusor.h"

namespace psa {

absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace psa

#endif  // PSA_COMMON_SHA256_H_
