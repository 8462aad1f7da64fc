// What every PSA-Serve server binary does around its services: standard
// health checking and reflection, a port file for launchers and tests,
// waiting for SIGINT/SIGTERM, and a graceful shutdown.
#ifndef PSA_COMMON_GRPC_SERVER_MAIN_H_
#define PSA_COMMON_GRPC_SERVER_MAIN_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace psa {

// Keeps large message buffers (fetch answers of up to tens of MiB) in the
// heap instead of fresh mmap()s: without it every big message costs page
// faults and madvise() calls, which halved fetch throughput in
// bench/kv_fetch_bench. Call at the start of main() of processes that move
// KV blocks.
void TuneMallocForLargeMessages();

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

// Marks the server NOT_SERVING, runs `drain` (ends long streams), then
// shuts down, cancelling whatever is still running after `grace`.
void GracefulShutdown(grpc::Server* server, const std::function<void()>& drain,
                      absl::Duration grace);

}  // namespace psa

#endif  // PSA_COMMON_GRPC_SERVER_MAIN_H_
