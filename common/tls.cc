#include "common/tls.h"

#include <fstream>
#include <iterator>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace psa {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, "=", path, ": cannot read the file"));
  std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!absl::StrContains(pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(flag, "=", path, ": not a PEM file"));
  }
  return pem;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const TlsFiles& f) {
  if (!UsesTls(f)) return grpc::InsecureServerCredentials();
  if (f.cert.empty() || f.key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TLS needs both ", f.flag_prefix, "cert_file and ", f.flag_prefix, "key_file"));
  }
  absl::StatusOr<std::string> cert = ReadPem(f.cert, f.flag_prefix + "cert_file");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem(f.key, f.flag_prefix + "key_file");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!f.ca.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(f.ca, f.flag_prefix + "client_ca_file");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const TlsFiles& f) {
  if (!UsesTls(f)) return grpc::InsecureChannelCredentials();
  if (f.cert.empty() != f.key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a client certificate needs both ", f.flag_prefix, "cert_file and ", f.flag_prefix,
        "key_file"));
  }
  grpc::SslCredentialsOptions options;
  if (!f.ca.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(f.ca, f.flag_prefix + "ca_file");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  if (!f.cert.empty()) {
    absl::StatusOr<std::string> cert = ReadPem(f.cert, f.flag_prefix + "cert_file");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem(f.key, f.flag_prefix + "key_file");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::SslCredentials(options);
}

}  // namespace psa
