// HttpFrontDoor: the router's OpenAI-compatible HTTP API —
//   POST /v1/completions, POST /v1/chat/completions (JSON or server-sent
//   events), GET /v1/models, GET /v1/models/{id}, GET /health.
// A translator only: each request becomes a psa.v1.Generation call on the
// router's own gRPC server through an in-process channel, so admission,
// queueing, retries, resumes, deadlines and metrics are the gRPC path's.
//
// Transport: cpp-httplib (Debian's libcpp-httplib), one pool thread per open
// connection while it is served. Nothing is sent until the generation's
// first message (streams) or its end (JSON), so a failure until then gets
// OpenAI's error object with its HTTP status; a stream that fails later ends
// with an error event. Meanwhile the client's socket is polled every
// `poll_interval`: a client that disconnects cancels its generation.
//
// Ownership: borrows the channel's server, which must outlive this object.
// Thread-safe: the server runs on its own threads; the destructor stops it
// and waits for the handlers.
#ifndef PSA_ROUTER_OPENAI_HTTP_FRONT_DOOR_H_
#define PSA_ROUTER_OPENAI_HTTP_FRONT_DOOR_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "common/api_keys.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}

namespace psa::openai {

struct HttpFrontDoorOptions {
  std::string listen = "0.0.0.0:8000";  // host:port; port 0: pick one
  // The model name clients send and /v1/models lists; empty: the name the
  // workers report (ModelInfo.served_name), asked at the first request that
  // needs it.
  std::string served_model;
  uint64_t max_body_bytes = 4 << 20;  // larger bodies: 413
  int threads = 512;                  // connections served at once; more wait
  absl::Duration poll_interval = absl::Milliseconds(250);  // client disconnect checks
  // True while the router can serve (a healthy worker): GET /health.
  std::function<bool()> ready;
  // Keys clients must send ("Authorization: Bearer KEY"; /health is open);
  // null: none. Must outlive the server.
  ApiKeys* api_keys = nullptr;
  // Sent as "authorization" on the calls to the router, which accepts it
  // (RouterOptions::internal_authorization); empty: none.
  std::string internal_authorization;
  // HTTPS with this certificate chain and key (PEM files); empty: HTTP.
  std::string tls_cert_file, tls_key_file;
};

class HttpFrontDoor {
 public:
  // Binds and starts serving on its own threads. `channel` reaches the
  // router's Generation service (Server::InProcessChannel).
  static absl::StatusOr<std::unique_ptr<HttpFrontDoor>> Start(
      HttpFrontDoorOptions options, std::shared_ptr<grpc::Channel> channel);
  ~HttpFrontDoor();

  int port() const { return port_; }

 private:
  HttpFrontDoor(HttpFrontDoorOptions options, std::shared_ptr<grpc::Channel> channel);
  void Register();
  // False after answering 401 when keys are required and the request's is
  // missing or unknown; else `tenant` (may be null) gets the key's tenant.
  bool Authorized(const httplib::Request& req, httplib::Response& res, std::string* tenant);
  // The served model's name and info; empty name when no worker answers.
  std::string ServedModel(psa::v1::ModelInfo* info = nullptr);

  const HttpFrontDoorOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<psa::v1::Generation::Stub> stub_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;

  absl::Mutex mu_;
  std::string model_ ABSL_GUARDED_BY(mu_);
  psa::v1::ModelInfo info_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa::openai

#endif  // PSA_ROUTER_OPENAI_HTTP_FRONT_DOOR_H_
