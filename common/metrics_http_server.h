// A minimal HTTP/1.0 server for Prometheus scrapes: GET /metrics returns the
// registry's text exposition, GET /healthz returns "ok" (alive), GET /readyz
// 200 while the server is marked ready, else 503 (Kubernetes probes that
// work whether or not the gRPC port speaks TLS). One background
// thread, one request per connection: scrapes are rare and small.
#ifndef PSA_COMMON_METRICS_HTTP_SERVER_H_
#define PSA_COMMON_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics.h"

namespace psa::metrics {

class MetricsHttpServer {
 public:
  // Listens on `address`:`port` (port 0 picks a free one).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      Registry* registry, const std::string& address, int port);
  ~MetricsHttpServer();  // stops the thread and closes the socket

  int port() const { return port_; }
  // What GET /readyz answers: set once serving, cleared when draining.
  void SetReady(bool ready) { ready_.store(ready); }

 private:
  MetricsHttpServer(Registry* registry, int fd, int port);
  void Serve();
  void HandleConnection(int fd);

  Registry* const registry_;
  const int listen_fd_;
  const int port_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> ready_{false};
  std::thread thread_;
};

}  // namespace psa::metrics

#endif  // PSA_COMMON_METRICS_HTTP_SERVER_H_
