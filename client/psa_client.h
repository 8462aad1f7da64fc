// The PSA-Serve C++ client SDK: generation, tokenization and model info over
// psa.v1.Generation, against the router (or, for development, a worker).
//
//   auto client = psa::client::Client::Connect({.target = "localhost:7000"});
//   auto done = (*client)->Generate(psa::client::TextPrompt("Hello", 64),
//                                   [](const psa::v1::GenerateResponse& r) {
//                                     std::cout << r.text() << std::flush;
//                                     return true;  // false cancels
//                                   });
//
// Every call has a deadline; a call that fails with UNAVAILABLE before the
// first token is retried (gRPC retry policy). Errors come back as
// absl::Status carrying the server's code and message.
#ifndef PSA_CLIENT_PSA_CLIENT_H_
#define PSA_CLIENT_PSA_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace psa::client {

struct ClientOptions {
  std::string target;                         // "host:port"
  absl::Duration timeout = absl::Minutes(5);  // deadline of each call
  int max_attempts = 4;                       // 1: no retries
  bool tls = false;                           // TLS with the system's root certificates...
  std::string tls_root_certs;                 // ...or these (PEM)
  std::string api_key;                        // sent as "authorization: Bearer KEY"; empty: none
};

struct Completion {
  std::string text;
  std::vector<uint32_t> token_ids;
  std::string finish_reason;  // "eos", "stop", "length", "cancelled"
  psa::v1::Usage usage;
};

// Called with each streamed message; return false to cancel the generation.
using ChunkCallback = std::function<bool(const psa::v1::GenerateResponse& chunk)>;

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(ClientOptions options);

  // Runs a generation to its end, streaming chunks to `on_chunk` if given.
  // A cancellation by `on_chunk` returns the completion so far with
  // finish_reason "cancelled".
  absl::StatusOr<Completion> Generate(const psa::v1::GenerateRequest& request,
                                      const ChunkCallback& on_chunk = nullptr);
  absl::StatusOr<std::vector<uint32_t>> Tokenize(const std::string& text);
  absl::StatusOr<psa::v1::ModelInfo> GetModelInfo();

  const std::string& target() const { return options_.target; }

 private:
  Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel);
  std::unique_ptr<grpc::ClientContext> Context() const;

  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<psa::v1::Generation::Stub> stub_;
};

// Request builders for the common cases.
psa::v1::GenerateRequest TextPrompt(const std::string& text, int max_tokens);
psa::v1::GenerateRequest ChatPrompt(const std::vector<std::pair<std::string, std::string>>& messages,
                                    int max_tokens);

}  // namespace psa::client

#endif  // PSA_CLIENT_PSA_CLIENT_H_
