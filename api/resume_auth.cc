#include "api/resume_auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace psa {
namespace {

// Fixed-width little-endian fields and length-prefixed strings: one byte
// string per request, whatever the protobuf encoding of it was.
void PutU64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

void PutBytes(std::string_view s, std::string* out) {
  PutU64(s.size(), out);
  out->append(s);
}

std::string SignedBytes(const psa::v1::GenerateRequest& r) {
  std::string out = "psa.v1.GenerateRequest.resume/1";
  PutU64(r.prompt_case(), &out);
  switch (r.prompt_case()) {
    case psa::v1::GenerateRequest::kText:
      PutBytes(r.text(), &out);
      break;
    case psa::v1::GenerateRequest::kChat:
      PutU64(r.chat().messages_size(), &out);
      for (const auto& m : r.chat().messages()) {
        PutBytes(m.role(), &out);
        PutBytes(m.content(), &out);
      }
      break;
    case psa::v1::GenerateRequest::kTokenIds:
      PutU64(r.token_ids().ids_size(), &out);
      for (uint32_t id : r.token_ids().ids()) PutU64(id, &out);
      break;
    default:
      break;
  }
  PutU64(r.max_tokens(), &out);
  PutU64(r.resume().token_ids_size(), &out);
  for (uint32_t id : r.resume().token_ids()) PutU64(id, &out);
  PutU64(r.resume().text_bytes(), &out);
  return out;
}

}  // namespace

absl::StatusOr<ResumeAuth> ResumeAuth::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read the secret file ", path));
  std::stringstream text;
  text << in.rdbuf();
  std::string secret(absl::StripAsciiWhitespace(text.str()));
  if (secret.size() < kMinSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the secret in ", path, " is ", secret.size(), " bytes; it must be at least ",
        kMinSecretBytes, " (e.g. head -c 32 /dev/urandom | base64 > ", path, ")"));
  }
  return ResumeAuth(std::move(secret));
}

std::string ResumeAuth::Sign(const psa::v1::GenerateRequest& request) const {
  const std::string data = SignedBytes(request);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret_.data(), static_cast<int>(secret_.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, &len);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(mac), len));
}

absl::Status ResumeAuth::Verify(const psa::v1::GenerateRequest& request,
                                std::string_view signature) const {
  if (signature.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "resume is set by the router only, when it continues a generation on another worker "
        "(signed in the gRPC metadata \"", kMetadataKey, "\"); clients must not set it"));
  }
  const std::string expected = Sign(request);
  if (signature.size() != expected.size() ||
      CRYPTO_memcmp(signature.data(), expected.data(), expected.size()) != 0) {
    return absl::PermissionDeniedError(
        "the resume's signature does not match: the router and this worker have different "
        "--resume_secret_file secrets, or the request was changed after the router signed it");
  }
  return absl::OkStatus();
}

}  // namespace psa
