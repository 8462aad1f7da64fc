// psa-router: the public front door of a PSA-Serve cluster.
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "openssl/rand.h"
#include "absl/strings/str_split.h"
#include "common/byte_size.h"
#include "common/flags_main.h"
#include "common/grpc_server_main.h"
#include "common/server_tls_flags.h"
#include "common/tls.h"
#include "router/openai/http_front_door.h"
#include "router/router_service.h"
#include "router/worker_pool.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:7000", "gRPC address to serve on (port 0: pick one)");
ABSL_FLAG(std::string, worker_tls_ca_file, "",
          "Connect to the workers over TLS, trusting this CA (PEM); empty: plaintext unless "
          "--worker_tls_cert_file is set (then the system's roots)");
ABSL_FLAG(std::string, worker_tls_cert_file, "",
          "Mutual TLS to the workers: the router's certificate (PEM); needs --worker_tls_key_file");
ABSL_FLAG(std::string, worker_tls_key_file, "", "The private key of --worker_tls_cert_file (PEM)");
ABSL_FLAG(std::string, worker_tls_server_name, "",
          "The name the workers' certificate carries, checked instead of their address (e.g. "
          "the headless Service's name for --workers_dns workers, which are IPs)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9000",
          "IPv4 address:port for Prometheus /metrics (port 0: pick one; empty: off)");
ABSL_FLAG(std::string, http_listen, "0.0.0.0:8000",
          "host:port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
          "/v1/models, /health); port 0: pick one; empty: off");
ABSL_FLAG(std::string, served_model_name, "",
          "The model name HTTP clients send and /v1/models lists; empty: the name the workers "
          "report");
ABSL_FLAG(int, http_threads, 512,
          "HTTP connections served at once (a thread each while served); more wait their turn");
ABSL_FLAG(std::string, port_file, "",
          "If set, write grpc_port=N, metrics_port=M and http_port=H here once serving");
ABSL_FLAG(std::string, workers, "", "Worker addresses, host:port, comma-separated");
ABSL_FLAG(std::string, workers_dns, "",
          "NAME:PORT whose DNS A records are the workers (e.g. a Kubernetes headless "
          "Service), re-resolved at every health check");
ABSL_FLAG(std::string, workers_file, "",
          "File with one worker address per line (# comments), re-read at every health check "
          "as --workers_dns is: workers added join, workers removed are forgotten");
ABSL_FLAG(int, max_inflight, 256, "Generations relayed at once");
ABSL_FLAG(int, max_queued, 256,
          "Generations waiting for a relay slot; more are refused with RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_attempts, 3, "Workers tried per request, the first included");
ABSL_FLAG(int, affinity_slack, 4,
          "Prefer the prompt's affinity worker unless it has more than this many requests "
          "outstanding beyond the least loaded one");
ABSL_FLAG(int, health_interval_ms, 500,
          "Milliseconds between checks of the workers' health (all checked at once, each with "
          "this deadline)");
ABSL_FLAG(int, forget_worker_after_polls, 10,
          "A --workers_dns or --workers_file worker missing from this many consecutive answers "
          "is forgotten "
          "(dropped with its metric series); until then it only gets no new requests");
ABSL_FLAG(std::string, resume_secret_file, "",
          "File holding the secret (16+ bytes) shared with the workers' --resume_secret_file: "
          "the router signs the resume it sends when a worker fails mid-stream. Without it such "
          "a generation fails instead of continuing on another worker");
ABSL_FLAG(std::string, api_keys_file, "",
          "File of the API keys clients must send (\"KEY [TENANT]\" per line; re-read when it "
          "changes) as \"authorization: Bearer KEY\" (gRPC metadata, HTTP header); empty: no key "
          "needed");
ABSL_FLAG(std::string, max_request_bytes, "4MiB",
          "Largest request accepted (e.g. 4MiB); gRPC refuses a larger message with "
          "RESOURCE_EXHAUSTED. Keep it at most the workers' --max_request_bytes");
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
  const std::string workers_file = absl::GetFlag(FLAGS_workers_file);
  if (!workers_file.empty()) {  // checked once here; later a bad read keeps the last view
    absl::StatusOr<std::vector<std::string>> listed = psa::ReadWorkersFile(workers_file);
    if (!listed.ok()) return Fail(absl::StrCat("--workers_file: ", listed.status().message()));
  }
  if (workers.empty() && absl::GetFlag(FLAGS_workers_dns).empty() && workers_file.empty()) {
    return Fail("no workers: set --workers, --workers_file or --workers_dns");
  }
  psa::RouterOptions options;
  options.max_inflight = absl::GetFlag(FLAGS_max_inflight);
  options.max_queued = absl::GetFlag(FLAGS_max_queued);
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  if (options.max_inflight < 1 || options.max_attempts < 1 || options.max_queued < 0) {
    return Fail("--max_inflight and --max_attempts must be >= 1, --max_queued >= 0");
  }

  absl::StatusOr<uint64_t> max_request_bytes =
      psa::ParseByteSize(absl::GetFlag(FLAGS_max_request_bytes));
  if (!max_request_bytes.ok() || *max_request_bytes < 1024 || *max_request_bytes > (1u << 31) - 1) {
    return Fail(absl::StrCat("--max_request_bytes=", absl::GetFlag(FLAGS_max_request_bytes),
                             " must be a size from 1KiB to 2GiB-1 (e.g. 4MiB)"));
  }

  std::optional<psa::ResumeAuth> resume_auth;
  if (const std::string path = absl::GetFlag(FLAGS_resume_secret_file); !path.empty()) {
    absl::StatusOr<psa::ResumeAuth> auth = psa::ResumeAuth::FromFile(path);
    if (!auth.ok()) return Fail(absl::StrCat("--resume_secret_file: ", auth.status().message()));
    resume_auth.emplace(std::move(*auth));
    options.resume_auth = &*resume_auth;
  } else {
    std::fprintf(stderr, "psa-router: no --resume_secret_file: a generation whose worker fails "
                         "after its first token fails too, instead of resuming elsewhere\n");
  }

  std::unique_ptr<psa::ApiKeys> api_keys;
  if (const std::string path = absl::GetFlag(FLAGS_api_keys_file); !path.empty()) {
    absl::StatusOr<std::unique_ptr<psa::ApiKeys>> loaded = psa::ApiKeys::Load(path);
    if (!loaded.ok()) return Fail(absl::StrCat("--api_keys_file: ", loaded.status().message()));
    api_keys = std::move(*loaded);
    options.api_keys = api_keys.get();
    // The HTTP front door's calls: a per-process secret, checked as a key.
    unsigned char secret[32];
    if (RAND_bytes(secret, sizeof(secret)) != 1) return Fail("no random bytes for a secret");
    options.internal_authorization =
        absl::StrCat("Bearer internal-", absl::BytesToHexString(absl::string_view(
                                             reinterpret_cast<const char*>(secret), 32)));
  }

  psa::metrics::Registry registry;
  psa::WorkerPoolOptions pool_options;
  pool_options.workers = workers;
  pool_options.workers_dns = absl::GetFlag(FLAGS_workers_dns);
  pool_options.workers_file = workers_file;
  pool_options.affinity_slack = absl::GetFlag(FLAGS_affinity_slack);
  pool_options.health_interval = absl::Milliseconds(absl::GetFlag(FLAGS_health_interval_ms));
  pool_options.forget_after_polls = absl::GetFlag(FLAGS_forget_worker_after_polls);
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> worker_credentials =
      psa::ChannelCredentials({absl::GetFlag(FLAGS_worker_tls_ca_file),
                               absl::GetFlag(FLAGS_worker_tls_cert_file),
                               absl::GetFlag(FLAGS_worker_tls_key_file), "--worker_tls_"});
  if (!worker_credentials.ok()) return Fail(std::string(worker_credentials.status().message()));
  pool_options.credentials = *worker_credentials;
  pool_options.tls_server_name = absl::GetFlag(FLAGS_worker_tls_server_name);
  if (pool_options.forget_after_polls < 1) return Fail("--forget_worker_after_polls must be >= 1");
  auto pool = std::make_unique<psa::WorkerPool>(pool_options, &registry);
  auto service = std::make_unique<psa::RouterService>(pool.get(), &registry, options);

  // The port file is written once every listener is up.
  psa::ServeOptions serve;
  serve.listen = absl::GetFlag(FLAGS_listen);
  serve.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  serve.port_file = "";
  serve.max_receive_bytes = *max_request_bytes;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_credentials =
      psa::ServerCredentialsFromFlags();
  if (!server_credentials.ok()) return Fail(std::string(server_credentials.status().message()));
  serve.credentials = *server_credentials;
  auto running = psa::StartServer(serve, &registry, {service.get()});
  if (!running.ok()) return Fail(std::string(running.status().message()));
  const int grpc_port = running->grpc_port, metrics_port = running->metrics_port;

  std::unique_ptr<psa::openai::HttpFrontDoor> http;
  if (const std::string listen = absl::GetFlag(FLAGS_http_listen); !listen.empty()) {
    psa::openai::HttpFrontDoorOptions http_options;
    http_options.listen = listen;
    http_options.served_model = absl::GetFlag(FLAGS_served_model_name);
    http_options.max_body_bytes = *max_request_bytes;
    http_options.threads = absl::GetFlag(FLAGS_http_threads);
    if (http_options.threads < 1) return Fail("--http_threads must be >= 1");
    http_options.ready = [p = pool.get()] { return p->healthy_count() > 0; };
    http_options.api_keys = api_keys.get();
    http_options.tls_cert_file = psa::ServerTlsFilesFromFlags().cert;
    http_options.tls_key_file = psa::ServerTlsFilesFromFlags().key;
    http_options.internal_authorization = options.internal_authorization;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    auto started = psa::openai::HttpFrontDoor::Start(std::move(http_options),
                                                     running->grpc->InProcessChannel(args));
    if (!started.ok()) return Fail(std::string(started.status().message()));
    http = std::move(*started);
  }
  const int http_port = http ? http->port() : 0;
  if (const std::string path = absl::GetFlag(FLAGS_port_file); !path.empty()) {
    std::map<std::string, int> ports = {{"grpc_port", grpc_port}, {"metrics_port", metrics_port}};
    if (http) ports["http_port"] = http_port;
    if (absl::Status s = psa::WritePortFile(path, ports); !s.ok()) {
      return Fail(absl::StrCat("--port_file: ", s.message()));
    }
  }
  std::fprintf(stderr,
               "psa-router: serving on port %d (metrics on %d, HTTP on %d), %d healthy workers\n",
               grpc_port, metrics_port, http_port, pool->healthy_count());

  const int sig = psa::WaitForTerminationSignal();
  std::fprintf(stderr, "psa-router: signal %d, finishing running generations\n", sig);
  http.reset();  // no new HTTP requests; those running end with their calls below
  psa::GracefulShutdown(*running, nullptr,
                        absl::Milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  service.reset();
  std::fprintf(stderr, "psa-router: stopped\n");
  return 0;
}
