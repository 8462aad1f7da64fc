// ResumeAuth: GenerateRequest.resume is accepted from the router only. The
// router signs every resume it sends (HMAC-SHA256 under a secret it shares
// with the workers: --resume_secret_file on both) in the gRPC metadata
// entry kMetadataKey; a worker refuses a resume without a valid signature
// (PERMISSION_DENIED), so a client cannot forge "generated" tokens, nor the
// usage they would count as.
//
// The signature covers the prompt, max_tokens and the resume fields, so one
// seen on the wire vouches for that same resume only.
//
// Ownership: holds a copy of the secret. Thread-safety: immutable after
// construction; every method is safe from any thread.
#ifndef PSA_API_RESUME_AUTH_H_
#define PSA_API_RESUME_AUTH_H_

#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/psa/v1/generation.pb.h"

namespace psa {

class ResumeAuth {
 public:
  // gRPC metadata key of the signature (lowercase hex).
  static constexpr char kMetadataKey[] = "psa-resume-signature";
  static constexpr size_t kMinSecretBytes = 16;

  // Reads the secret from `path`: the file's contents, surrounding
  // whitespace dropped; at least kMinSecretBytes. The error names the file.
  static absl::StatusOr<ResumeAuth> FromFile(const std::string& path);
  explicit ResumeAuth(std::string secret) : secret_(std::move(secret)) {}

  // The signature of `request`'s resume fields, prompt and max_tokens.
  std::string Sign(const psa::v1::GenerateRequest& request) const;

  // OK if `signature` is Sign(request) (compared in constant time); else
  // PERMISSION_DENIED saying what is wrong. `signature` empty: none sent.
  absl::Status Verify(const psa::v1::GenerateRequest& request,
                      std::string_view signature) const;

 private:
  std::string secret_;
};

}  // namespace psa

#endif  // PSA_API_RESUME_AUTH_H_
