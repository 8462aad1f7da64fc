#include "common/grpc_server_main.h"

#include <malloc.h>
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_callback_queue.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace psa {
namespace {

sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void TuneMallocForLargeMessages() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's maximum
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

void DisableMutexDeadlockDetection() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

void BlockTerminationSignals() {
  sigset_t set = TerminationSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSignals();
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

void EnableHealthAndReflection() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
}

absl::Status WritePortFile(const std::string& path, const std::map<std::string, int>& ports) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    for (const auto& [name, port] : ports) out << name << "=" << port << "\n";
    if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<RunningServer> StartServer(const ServeOptions& options,
                                          metrics::Registry* registry,
                                          const std::vector<grpc::Service*>& services) {
  PinGrpcCallbackQueue();  // see common/grpc_callback_queue.h
  RunningServer running;
  if (!options.metrics_listen.empty()) {
    const size_t colon = options.metrics_listen.rfind(':');
    int port = -1;
    if (colon == std::string::npos ||
        !absl::SimpleAtoi(options.metrics_listen.substr(colon + 1), &port)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--metrics_listen \"", options.metrics_listen, "\" must look like 0.0.0.0:9100"));
    }
    auto metrics = metrics::MetricsHttpServer::Start(
        registry, options.metrics_listen.substr(0, colon), port);
    if (!metrics.ok()) return metrics.status();
    running.metrics = std::move(*metrics);
    running.metrics_port = running.metrics->port();
  }
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen,
                           options.credentials ? options.credentials
                                               : grpc::InsecureServerCredentials(),
                           &running.grpc_port);
  if (options.max_message_bytes > 0) {
    builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
    builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  }
  if (options.max_receive_bytes > 0) {
    if (options.max_receive_bytes > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the request size limit ", options.max_receive_bytes, " is over gRPC's maximum of ",
          std::numeric_limits<int>::max(), " bytes"));
    }
    builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_receive_bytes));
  }
  for (grpc::Service* service : services) builder.RegisterService(service);
  running.grpc = builder.BuildAndStart();
  if (running.grpc == nullptr || running.grpc_port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve on ", options.listen, " (address in use or malformed?)"));
  }
  if (!options.port_file.empty()) {
    absl::Status s = WritePortFile(
        options.port_file,
        {{"grpc_port", running.grpc_port}, {"metrics_port", running.metrics_port}});
    if (!s.ok()) return s;
  }
  if (running.metrics) running.metrics->SetReady(true);
  return running;
}

void GracefulShutdown(RunningServer& running, const std::function<void()>& drain,
                      absl::Duration grace) {
  if (running.metrics) running.metrics->SetReady(false);
  GracefulShutdown(running.grpc.get(), drain, grace);
}

void GracefulShutdown(grpc::Server* server, const std::function<void()>& drain,
                      absl::Duration grace) {
  if (auto* health = server->GetHealthCheckService()) health->Shutdown();
  if (drain) drain();
  server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  server->Wait();
}

}  // namespace psa
