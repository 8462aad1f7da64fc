#include "router/worker_pool.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "kv_service/hash_ring.h"
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
  for (const std::string& address : options_.workers) {
    auto w = std::make_unique<Worker>();
    w->address = address;
    w->channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    w->stub = psa::v1::Generation::NewStub(w->channel);
    workers_.push_back(std::move(w));
  }
  state_.resize(workers_.size());
  PollHealth();  // know the state before the first request
  poller_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options_.health_interval)) PollHealth();
  });
}

WorkerPool::~WorkerPool() {
  stop_.Notify();
  poller_.join();
}

void WorkerPool::PollHealth() {
  for (size_t i = 0; i < workers_.size(); ++i) {
    auto stub = grpc::health::v1::Health::NewStub(workers_[i]->channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_interval));
    grpc::health::v1::HealthCheckResponse response;
    const bool ok = stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response).ok() &&
                    response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    healthy_gauge_.Add({{"worker", workers_[i]->address}}).Set(ok ? 1 : 0);
    absl::MutexLock lock(&mu_);
    state_[i].healthy = ok;
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
