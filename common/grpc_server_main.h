// What every PSA-Serve server binary does around its services: standard
// health checking and reflection, a port file for launchers and tests,
// waiting for SIGINT/SIGTERM, and a graceful shutdown.
#ifndef PSA_COMMON_GRPC_SERVER_MAIN_H_
#define PSA_COMMON_GRPC_SERVER_MAIN_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "common/metrics_http_server.h"

namespace psa {

// Keeps large message buffers (fetch answers of up to tens of MiB) in the
// heap instead of fresh mmap()s: without it every big message costs page
// faults and madvise() calls, which halved fetch throughput in
// bench/kv_fetch_bench. Call at the start of main() of processes that move
// KV blocks.
void TuneMallocForLargeMessages();

// Turns off absl::Mutex deadlock detection. Debian's Abseil is built
// without NDEBUG, so every Lock() and every Mutex destructor updates a
// global lock graph under a global lock; the worker makes and destroys a
// Mutex per attention task. Servers take the cost off their hot paths;
// tests keep the checking.
void DisableMutexDeadlockDetection();

// Blocks SIGINT and SIGTERM in this thread and the threads it starts later,
// so that WaitForTerminationSignal() receives them. Call first in main().
void BlockTerminationSignals();

// Returns the signal number once SIGINT or SIGTERM arrives.
int WaitForTerminationSignal();

// Turns on grpc.health.v1 and server reflection for servers built after.
void EnableHealthAndReflection();

// Writes "name=value" lines atomically (temp file + rename), so a reader
// never sees a half-written file. Used for the bound ports.
absl::Status WritePortFile(const std::string& path, const std::map<std::string, int>& ports);

struct ServeOptions {
  std::string listen;              // gRPC host:port (port 0: pick one)
  std::string metrics_listen;      // IPv4 host:port for /metrics; empty: none
  std::string port_file;           // WritePortFile() here once serving; empty: none
  uint64_t max_message_bytes = 0;  // both directions; 0: gRPC's default
  // Received messages only, over max_message_bytes; gRPC refuses a larger
  // one with RESOURCE_EXHAUSTED naming both sizes. 0: as max_message_bytes.
  uint64_t max_receive_bytes = 0;
  // The gRPC port's credentials (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

struct RunningServer {
  std::unique_ptr<metrics::MetricsHttpServer> metrics;  // null without metrics_listen
  std::unique_ptr<grpc::Server> grpc;
  int grpc_port = 0;
  int metrics_port = 0;
};

// Starts the metrics endpoint and a gRPC server with `services` plus health
// and reflection, then writes the port file. The error names the flag or
// address at fault.
absl::StatusOr<RunningServer> StartServer(const ServeOptions& options,
                                          metrics::Registry* registry,
                                          const std::vector<grpc::Service*>& services);

// Marks the server NOT_SERVING, runs `drain` (ends long streams), then
// shuts down, cancelling whatever is still running after `grace`.
void GracefulShutdown(grpc::Server* server, const std::function<void()>& drain,
                      absl::Duration grace);
// The same for a StartServer() result, /readyz turned 503 first.
void GracefulShutdown(RunningServer& running, const std::function<void()>& drain,
                      absl::Duration grace);

}  // namespace psa

#endif  // PSA_COMMON_GRPC_SERVER_MAIN_H_
