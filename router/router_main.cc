// psa-router: the public front door of a PSA-Serve cluster.
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/flags_main.h"
#include "common/grpc_server_main.h"
#include "router/router_service.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:7000", "gRPC address to serve on (port 0: pick one)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9000",
          "IPv4 address:port for Prometheus /metrics (port 0: pick one; empty: off)");
ABSL_FLAG(std::string, port_file, "",
          "If set, write grpc_port=N and metrics_port=M here once serving");
ABSL_FLAG(std::string, workers, "", "Worker addresses, host:port, comma-separated");
ABSL_FLAG(std::string, workers_dns, "",
          "NAME:PORT whose DNS A records are the workers (e.g. a Kubernetes headless "
          "Service), re-resolved at every health check");
ABSL_FLAG(std::string, workers_file, "",
          "File with one worker address per line (# comments), added to --workers");
ABSL_FLAG(int, max_inflight, 256, "Generations relayed at once");
ABSL_FLAG(int, max_queued, 256,
          "Generations waiting for a relay slot; more are refused with RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_attempts, 3, "Workers tried per request, the first included");
ABSL_FLAG(int, affinity_slack, 4,
          "Prefer the prompt's affinity worker unless it has more than this many requests "
          "outstanding beyond the least loaded one");
ABSL_FLAG(int, health_interval_ms, 500, "Milliseconds between checks of the workers' health");
ABSL_FLAG(int, shutdown_grace_ms, 10000,
          "On SIGTERM or SIGINT: milliseconds running generations may take to finish before "
          "they are cancelled");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "psa-router: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  psa::ParseFlags(
      argc, argv,
      "Routes psa.v1.Generation requests to compute workers.\n"
      "Usage: psa-router --workers=HOST:PORT,... [--listen=ADDR:PORT] ...");
  psa::DisableMutexDeadlockDetection();
  psa::BlockTerminationSignals();

  std::vector<std::string> workers =
      absl::StrSplit(absl::GetFlag(FLAGS_workers), ',', absl::SkipEmpty());
  if (const std::string path = absl::GetFlag(FLAGS_workers_file); !path.empty()) {
    std::ifstream in(path);
    if (!in) return Fail(absl::StrCat("cannot read --workers_file ", path));
    std::string line;
    while (std::getline(in, line)) {
      absl::string_view w = absl::StripAsciiWhitespace(line);
      if (!w.empty() && w[0] != '#') workers.emplace_back(w);
    }
  }
  if (workers.empty() && absl::GetFlag(FLAGS_workers_dns).empty()) {
    return Fail("no workers: set --workers, --workers_file or --workers_dns");
  }
  psa::RouterOptions options;
  options.max_inflight = absl::GetFlag(FLAGS_max_inflight);
  options.max_queued = absl::GetFlag(FLAGS_max_queued);
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  if (options.max_inflight < 1 || options.max_attempts < 1 || options.max_queued < 0) {
    return Fail("--max_inflight and --max_attempts must be >= 1, --max_queued >= 0");
  }

  psa::metrics::Registry registry;
  psa::WorkerPoolOptions pool_options;
  pool_options.workers = workers;
  pool_options.workers_dns = absl::GetFlag(FLAGS_workers_dns);
  pool_options.affinity_slack = absl::GetFlag(FLAGS_affinity_slack);
  pool_options.health_interval = absl::Milliseconds(absl::GetFlag(FLAGS_health_interval_ms));
  auto pool = std::make_unique<psa::WorkerPool>(pool_options, &registry);
  auto service = std::make_unique<psa::RouterService>(pool.get(), &registry, options);

  auto running = psa::StartServer({absl::GetFlag(FLAGS_listen), absl::GetFlag(FLAGS_metrics_listen),
                                   absl::GetFlag(FLAGS_port_file)},
                                  &registry, {service.get()});
  if (!running.ok()) return Fail(std::string(running.status().message()));
  const int grpc_port = running->grpc_port, metrics_port = running->metrics_port;
  std::fprintf(stderr, "psa-router: serving on port %d (metrics on %d), %d healthy workers\n",
               grpc_port, metrics_port, pool->healthy_count());

  const int sig = psa::WaitForTerminationSignal();
  std::fprintf(stderr, "psa-router: signal %d, finishing running generations\n", sig);
  psa::GracefulShutdown(running->grpc.get(), nullptr,
                        absl::Milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  service.reset();
  std::fprintf(stderr, "psa-router: stopped\n");
  return 0;
}
