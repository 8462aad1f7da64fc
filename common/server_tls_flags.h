// The TLS flags every PSA-Serve server takes (--tls_cert_file,
// --tls_key_file, --tls_client_ca_file), defined once here and linked into
// each server binary, and the credentials they describe (common/tls.h).
#ifndef PSA_COMMON_SERVER_TLS_FLAGS_H_
#define PSA_COMMON_SERVER_TLS_FLAGS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/tls.h"

namespace psa {

// The files the flags name (flag_prefix "--tls_").
TlsFiles ServerTlsFilesFromFlags();

// ServerCredentials(ServerTlsFilesFromFlags()): plaintext without flags.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFromFlags();

}  // namespace psa

#endif  // PSA_COMMON_SERVER_TLS_FLAGS_H_
