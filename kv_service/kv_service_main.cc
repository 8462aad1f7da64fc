// psa-kv-service: the KV service process (one shard).
#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/byte_size.h"
#include "common/flags_main.h"
#include "common/grpc_server_main.h"
#include "common/server_tls_flags.h"
#include "common/tls.h"
#include "kv_service/kv_service_impl.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:7100", "gRPC address to serve on (port 0: pick one)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9100",
          "IPv4 address:port for Prometheus /metrics (port 0: pick one; empty: off)");
ABSL_FLAG(std::string, capacity, "4GiB",
          "Memory for KV blocks (e.g. 512MiB, 8GiB); least recently used unleased "
          "sequences are evicted beyond it");
ABSL_FLAG(std::string, max_message, "64MiB",
          "Largest gRPC message accepted or sent (bounds blocks per write or fetch)");
ABSL_FLAG(std::string, port_file, "",
          "If set, write grpc_port=N and metrics_port=M here once serving");
ABSL_FLAG(int, shutdown_grace_ms, 5000,
          "On SIGTERM or SIGINT: milliseconds running calls may take to finish before they are "
          "cancelled");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "psa-kv-service: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  psa::ParseFlags(
      argc, argv,
      "Serves the psa.v1.KvService: a host-memory store of KV cache blocks.\n"
      "Usage: psa-kv-service [--listen=ADDR:PORT] [--capacity=4GiB] ...");
  psa::TuneMallocForLargeMessages();
  psa::DisableMutexDeadlockDetection();
  psa::BlockTerminationSignals();

  absl::StatusOr<uint64_t> capacity = psa::ParseByteSize(absl::GetFlag(FLAGS_capacity));
  if (!capacity.ok()) return Fail(absl::StrCat("--capacity: ", capacity.status().message()));
  absl::StatusOr<uint64_t> max_message = psa::ParseByteSize(absl::GetFlag(FLAGS_max_message));
  if (!max_message.ok()) {
    return Fail(absl::StrCat("--max_message: ", max_message.status().message()));
  }
  if (*max_message < (64 << 10) || *max_message > (1ull << 31) - 1) {
    return Fail("--max_message must be at least 64KiB and less than 2GiB");
  }

  psa::metrics::Registry registry;
  psa::BlockStore store(psa::BlockStore::Options{*capacity});
  psa::ExportBlockStoreMetrics(&store, &registry);
  psa::KvServiceImpl service(&store, &registry, *max_message);

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_credentials =
      psa::ServerCredentialsFromFlags();
  if (!server_credentials.ok()) return Fail(std::string(server_credentials.status().message()));
  psa::ServeOptions serve;
  serve.listen = absl::GetFlag(FLAGS_listen);
  serve.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  serve.port_file = absl::GetFlag(FLAGS_port_file);
  serve.max_message_bytes = *max_message;
  serve.credentials = *server_credentials;
  auto running = psa::StartServer(serve, &registry, {&service});
  if (!running.ok()) return Fail(std::string(running.status().message()));
  const int grpc_port = running->grpc_port, metrics_port = running->metrics_port;
  std::fprintf(stderr,
               "psa-kv-service: serving on port %d (metrics on %d), capacity %s\n",
               grpc_port, metrics_port, psa::FormatByteSize(*capacity).c_str());

  const int sig = psa::WaitForTerminationSignal();
  std::fprintf(stderr, "psa-kv-service: signal %d, draining streams\n", sig);
  psa::GracefulShutdown(*running, [&] { service.Drain(); },
                        absl::Milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  std::fprintf(stderr, "psa-kv-service: stopped\n");
  return 0;
}
