#include "common/server_tls_flags.h"

#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, tls_cert_file, "",
          "Serve over TLS with this certificate chain (PEM; the router's HTTP API too); needs "
          "--tls_key_file");
ABSL_FLAG(std::string, tls_key_file, "", "The private key of --tls_cert_file (PEM)");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "Mutual TLS: require client certificates signed by this CA (PEM)");

namespace psa {

TlsFiles ServerTlsFilesFromFlags() {
  return {absl::GetFlag(FLAGS_tls_client_ca_file), absl::GetFlag(FLAGS_tls_cert_file),
          absl::GetFlag(FLAGS_tls_key_file), "--tls_"};
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFromFlags() {
  return ServerCredentials(ServerTlsFilesFromFlags());
}

}  // namespace psa
