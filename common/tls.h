// TLS credentials for every gRPC hop, from PEM files named by flags:
// servers (router, worker, KV shard) present a certificate and may require
// clients' certificates signed by a CA (mutual TLS); clients (router to
// worker, worker to KV shard, psactl) verify the server against a CA and may
// present their own certificate. All files empty: plaintext, as before.
//
// Stateless functions; the credentials they return are thread-safe.
#ifndef PSA_COMMON_TLS_H_
#define PSA_COMMON_TLS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace psa {

struct TlsFiles {
  std::string ca;    // server: CA of the client certificates it requires; client: CA it trusts
  std::string cert;  // this side's certificate chain (PEM)
  std::string key;   // its private key (PEM)
  // The flags' prefix for error messages, e.g. "--tls_" or "--kv_tls_".
  std::string flag_prefix = "--tls_";
};

// Insecure credentials when every file is empty. A server needs cert and
// key; with `ca` it requires and verifies client certificates.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const TlsFiles& files);

// Insecure credentials when every file is empty; with `ca` (or none: the
// system's roots) the server is verified; cert and key, if given, are sent.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const TlsFiles& files);

// True when any file is set.
inline bool UsesTls(const TlsFiles& f) { return !f.ca.empty() || !f.cert.empty() || !f.key.empty(); }

}  // namespace psa

#endif  // PSA_COMMON_TLS_H_
