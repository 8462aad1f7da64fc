#include "router/worker_pool.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"
#include "common/hash_ring.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"

namespace psa {
namespace {

constexpr size_t kAffinityBytes = 1024;  // the prompt start that decides affinity

uint64_t Mix(uint64_t a, uint64_t b) {
  uint64_t h = a ^ (b + 0x9e3779b97f4a7c15ull + (a << 6) + (a >> 2));
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  return h ^ (h >> 33);
}

}  // namespace

uint64_t PromptAffinity(const psa::v1::GenerateRequest& request) {
  std::string start;
  switch (request.prompt_case()) {
    case psa::v1::GenerateRequest::kText:
      start = request.text().substr(0, kAffinityBytes);
      break;
    case psa::v1::GenerateRequest::kChat:
      for (const auto& m : request.chat().messages()) {
        absl::StrAppend(&start, m.role(), ":", m.content(), "\n");
        if (start.size() >= kAffinityBytes) break;
      }
      start.resize(std::min(start.size(), kAffinityBytes));
      break;
    case psa::v1::GenerateRequest::kTokenIds:
      for (int i = 0; i < request.token_ids().ids_size() && start.size() < kAffinityBytes; ++i) {
        absl::StrAppend(&start, request.token_ids().ids(i), ",");
      }
      break;
    default:
      break;
  }
  return HashRing::Hash(start);
}

WorkerPool::WorkerPool(WorkerPoolOptions options, metrics::Registry* registry)
    : options_(std::move(options)),
      healthy_gauge_(registry->AddGauge("psa_router_worker_healthy",
                                        "1 if the worker answers health checks as SERVING")) {
  {
    absl::MutexLock lock(&mu_);
    for (const std::string& address : options_.workers) AddWorker(address);
  }
  PollHealth();  // know the state before the first request
  poller_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options_.health_interval)) PollHealth();
  });
}

WorkerPool::~WorkerPool() {
  stop_.Notify();
  poller_.join();
}

void WorkerPool::AddWorker(const std::string& address) {
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i]->address == address) {
      listed_[i] = true;
      return;
    }
  }
  auto w = std::make_unique<Worker>();
  w->address = address;
  grpc::ChannelArguments args;
  // Notice a recovered worker within seconds (gRPC's default backoff grows
  // to two minutes between connection attempts).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  w->channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  w->stub = psa::v1::Generation::NewStub(w->channel);
  workers_.push_back(std::move(w));
  state_.emplace_back();
  listed_.push_back(true);
}

void WorkerPool::ResolveDns() {
  const std::string& spec = options_.workers_dns;
  const size_t colon = spec.rfind(':');
  if (spec.empty() || colon == std::string::npos) return;
  const std::string host = spec.substr(0, colon), port = spec.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return;  // keep the last view
  std::vector<std::string> addresses;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, ip, sizeof(ip));
    addresses.push_back(absl::StrCat(ip, ":", port));
  }
  freeaddrinfo(found);
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < workers_.size(); ++i) {
    // Static workers stay listed; DNS ones must be in this answer.
    listed_[i] = std::find(options_.workers.begin(), options_.workers.end(),
                           workers_[i]->address) != options_.workers.end();
  }
  for (const std::string& a : addresses) AddWorker(a);
}

void WorkerPool::PollHealth() {
  ResolveDns();
  std::vector<std::pair<size_t, Worker*>> to_check;
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < workers_.size(); ++i) to_check.emplace_back(i, workers_[i].get());
  }
  for (auto [i, worker] : to_check) {
    auto stub = grpc::health::v1::Health::NewStub(worker->channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_interval));
    grpc::health::v1::HealthCheckResponse response;
    const bool ok = stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response).ok() &&
                    response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    absl::MutexLock lock(&mu_);
    state_[i].healthy = ok && listed_[i];
    healthy_gauge_.Add({{"worker", worker->address}}).Set(state_[i].healthy ? 1 : 0);
  }
}

absl::StatusOr<WorkerPool::Worker*> WorkerPool::Acquire(uint64_t affinity,
                                                        const std::vector<Worker*>& exclude) {
  absl::MutexLock lock(&mu_);
  int preferred = -1, least = -1;
  uint64_t best_weight = 0;
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (!state_[i].healthy) continue;
    if (std::find(exclude.begin(), exclude.end(), workers_[i].get()) != exclude.end()) continue;
    const uint64_t weight = Mix(affinity, HashRing::Hash(workers_[i]->address));
    if (preferred < 0 || weight > best_weight) {
      preferred = i;
      best_weight = weight;
    }
    if (least < 0 || state_[i].outstanding < state_[least].outstanding) least = i;
  }
  if (preferred < 0) {
    return absl::UnavailableError(absl::StrCat(
        "no healthy worker can take the request (", workers_.size(), " configured, ",
        exclude.size(), " already failed it)"));
  }
  const int pick = state_[preferred].outstanding - state_[least].outstanding >
                           options_.affinity_slack
                       ? least
                       : preferred;
  ++state_[pick].outstanding;
  return workers_[pick].get();
}

void WorkerPool::Release(Worker* worker) {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].get() == worker) --state_[i].outstanding;
  }
}

void WorkerPool::ReportFailure(Worker* worker) {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].get() == worker) state_[i].healthy = false;
  }
}

int WorkerPool::healthy_count() {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const State& s : state_) n += s.healthy;
  return n;
}

}  // namespace psa
