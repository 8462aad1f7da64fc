#include "router/worker_pool.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/blocking_counter.h"
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

// The A records of "name:port" as "ip:port" each. A name without records
// is an empty answer (every worker gone); other failures are errors.
absl::StatusOr<std::vector<std::string>> ResolveDns(const std::string& spec) {
  const size_t colon = spec.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("workers_dns ", spec, " is not NAME:PORT"));
  }
  const std::string host = spec.substr(0, colon), port = spec.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  std::vector<std::string> addresses;
  if (rc == EAI_NONAME || rc == EAI_NODATA) return addresses;
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolving ", spec, ": ", gai_strerror(rc)));
  }
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, ip, sizeof(ip));
    std::string address = absl::StrCat(ip, ":", port);
    if (std::find(addresses.begin(), addresses.end(), address) == addresses.end()) {
      addresses.push_back(std::move(address));
    }
  }
  freeaddrinfo(found);
  return addresses;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ReadWorkersFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read workers file ", path));
  std::vector<std::string> addresses;
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view w = absl::StripAsciiWhitespace(line);
    if (w.empty() || w[0] == '#') continue;
    if (std::find(addresses.begin(), addresses.end(), w) == addresses.end()) {
      addresses.emplace_back(w);
    }
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading workers file ", path));
  return addresses;
}

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
  if (options_.discover) {
    discover_ = options_.discover;
  } else if (!options_.workers_dns.empty() || !options_.workers_file.empty()) {
    // Both sources merged; either failing keeps the last view of both.
    discover_ = [dns = options_.workers_dns,
                 file = options_.workers_file]() -> absl::StatusOr<std::vector<std::string>> {
      std::vector<std::string> all;
      if (!file.empty()) {
        absl::StatusOr<std::vector<std::string>> listed = ReadWorkersFile(file);
        if (!listed.ok()) return listed.status();
        all = std::move(*listed);
      }
      if (!dns.empty()) {
        absl::StatusOr<std::vector<std::string>> resolved = ResolveDns(dns);
        if (!resolved.ok()) return resolved.status();
        for (std::string& a : *resolved) {
          if (std::find(all.begin(), all.end(), a) == all.end()) all.push_back(std::move(a));
        }
      }
      return all;
    };
  }
  {
    absl::MutexLock lock(&mu_);
    for (const std::string& address : options_.workers) AddWorker(address, /*is_static=*/true);
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

void WorkerPool::AddWorker(const std::string& address, bool is_static) {
  for (Entry& e : entries_) {
    if (e.worker->address == address) {
      e.missed = 0;
      e.is_static |= is_static;
      return;
    }
  }
  auto w = std::make_shared<Worker>();
  w->address = address;
  grpc::ChannelArguments args;
  // Notice a recovered worker within seconds (gRPC's default backoff grows
  // to two minutes between connection attempts).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  if (!options_.tls_server_name.empty()) args.SetSslTargetNameOverride(options_.tls_server_name);
  w->channel = grpc::CreateCustomChannel(
      address, options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials(),
      args);
  w->stub = psa::v1::Generation::NewStub(w->channel);
  Entry e;
  e.worker = std::move(w);
  e.is_static = is_static;
  entries_.push_back(std::move(e));
}

WorkerPool::Entry* WorkerPool::Find(const Worker* worker) {
  for (Entry& e : entries_) {
    if (e.worker.get() == worker) return &e;
  }
  return nullptr;
}

void WorkerPool::Discover() {
  if (!discover_) return;
  absl::StatusOr<std::vector<std::string>> found = discover_();
  if (!found.ok()) return;  // keep the last view
  std::vector<std::string> joined, forgotten;
  {
    absl::MutexLock lock(&mu_);
    const int forget_after = std::max(1, options_.forget_after_polls);
    for (Entry& e : entries_) {
      const bool listed = std::find(found->begin(), found->end(), e.worker->address) !=
                          found->end();
      if (e.is_static || listed) {
        e.missed = 0;
      } else {
        ++e.missed;
        e.healthy = false;  // leaving: no new requests
        healthy_gauge_.Add({{"worker", e.worker->address}}).Set(0);
      }
    }
    // Forget: relays still holding a WorkerRef finish on it undisturbed.
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->missed < forget_after) {
        ++it;
        continue;
      }
      healthy_gauge_.Remove({{"worker", it->worker->address}});
      forgotten.push_back(it->worker->address);
      it = entries_.erase(it);
    }
    for (const std::string& a : *found) {
      if (std::none_of(entries_.begin(), entries_.end(),
                       [&](const Entry& e) { return e.worker->address == a; })) {
        joined.push_back(a);
      }
      AddWorker(a, /*is_static=*/false);
    }
  }
  for (const std::string& a : joined) {
    std::fprintf(stderr, "psa-router: worker %s joined\n", a.c_str());
  }
  for (const std::string& a : forgotten) {
    std::fprintf(stderr, "psa-router: worker %s left discovery, forgotten\n", a.c_str());
  }
}

void WorkerPool::PollHealth() {
  Discover();
  // One health check per worker, all in flight at once, each with its own
  // deadline: a round takes about one deadline however many workers time out.
  struct Check {
    WorkerRef worker;
    std::unique_ptr<grpc::health::v1::Health::Stub> stub;
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    bool ok = false;
  };
  std::vector<std::shared_ptr<Check>> checks;
  {
    absl::MutexLock lock(&mu_);
    for (const Entry& e : entries_) {
      checks.push_back(std::make_shared<Check>());
      checks.back()->worker = e.worker;
    }
  }
  const absl::Duration timeout = options_.health_timeout > absl::ZeroDuration()
                                     ? options_.health_timeout
                                     : options_.health_interval;
  const auto deadline = absl::ToChronoTime(absl::Now() + timeout);
  absl::BlockingCounter pending(static_cast<int>(checks.size()));
  for (const std::shared_ptr<Check>& c : checks) {
    c->stub = grpc::health::v1::Health::NewStub(c->worker->channel);
    c->ctx.set_deadline(deadline);
    // The callback shares the check, so its context outlives the call.
    c->stub->async()->Check(&c->ctx, &c->request, &c->response,
                            [c, &pending](grpc::Status status) {
                              c->ok = status.ok() &&
                                      c->response.status() ==
                                          grpc::health::v1::HealthCheckResponse::SERVING;
                              pending.DecrementCount();
                            });
  }
  pending.Wait();
  absl::MutexLock lock(&mu_);
  for (const std::shared_ptr<Check>& c : checks) {
    Entry* e = Find(c->worker.get());
    if (e == nullptr) continue;  // forgotten meanwhile: its series is gone, keep it so
    e->healthy = c->ok && e->missed == 0;
    healthy_gauge_.Add({{"worker", e->worker->address}}).Set(e->healthy ? 1 : 0);
  }
}

absl::StatusOr<WorkerPool::WorkerRef> WorkerPool::Acquire(uint64_t affinity,
                                                          const std::vector<WorkerRef>& exclude) {
  absl::MutexLock lock(&mu_);
  int preferred = -1, least = -1;
  uint64_t best_weight = 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (!e.healthy) continue;
    if (std::find(exclude.begin(), exclude.end(), e.worker) != exclude.end()) continue;
    const uint64_t weight = Mix(affinity, HashRing::Hash(e.worker->address));
    if (preferred < 0 || weight > best_weight) {
      preferred = i;
      best_weight = weight;
    }
    if (least < 0 || e.outstanding < entries_[least].outstanding) least = i;
  }
  if (preferred < 0) {
    return absl::UnavailableError(absl::StrCat(
        "no healthy worker can take the request (", entries_.size(), " known, ",
        exclude.size(), " already failed it)"));
  }
  const int pick = entries_[preferred].outstanding - entries_[least].outstanding >
                           options_.affinity_slack
                       ? least
                       : preferred;
  ++entries_[pick].outstanding;
  return entries_[pick].worker;
}

void WorkerPool::Release(const Worker* worker) {
  absl::MutexLock lock(&mu_);
  if (Entry* e = Find(worker)) --e->outstanding;
}

void WorkerPool::ReportFailure(const Worker* worker) {
  absl::MutexLock lock(&mu_);
  if (Entry* e = Find(worker)) e->healthy = false;
}

int WorkerPool::healthy_count() {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const Entry& e : entries_) n += e.healthy;
  return n;
}

std::vector<std::string> WorkerPool::addresses() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const Entry& e : entries_) out.push_back(e.worker->address);
  return out;
}

}  // namespace psa
