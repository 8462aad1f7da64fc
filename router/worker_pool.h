// WorkerPool: the router's view of its compute workers — discovery (a
// static list, DNS or an injected function), health (polled over
// grpc.health.v1, every worker concurrently) and load (requests the router
// has outstanding on each), and the dispatch policy.
//
// Policy: requests carry an affinity key (a hash of their prompt's start).
// Each key has a preferred worker by rendezvous hashing over the healthy
// workers, so requests sharing a prefix land where its KV was last computed
// and adding or losing a worker moves only its share of keys. The preferred
// worker is taken unless it has more than `affinity_slack` requests
// outstanding beyond the least loaded healthy worker; then the least loaded
// one is.
//
// Discovery sources: a static list (never forgotten), a DNS name and a
// workers file (both re-read before every poll, their answers merged).
//
// Churn: a discovered worker missing from an answer is unhealthy at once
// (no new requests) and forgotten after `forget_after_polls` consecutive
// answers without it: dropped from the pool, no longer health-checked, and
// its `psa_router_worker_healthy{worker}` series removed. If it comes back
// it is added again, as a new Worker. Static workers are never forgotten.
//
// Ownership: the pool borrows the registry (which must outlive it) and
// shares each Worker with the requests using it (std::shared_ptr), so a
// forgotten worker lives on until its last in-flight call ends.
// Thread-safe: every public method may be called from any thread; one
// poller thread discovers and health-checks, joined by the destructor.
#ifndef PSA_ROUTER_WORKER_POOL_H_
#define PSA_ROUTER_WORKER_POOL_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/security/credentials.h"
#include "common/metrics.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace psa {

struct WorkerPoolOptions {
  std::vector<std::string> workers;  // host:port each; static, never forgotten
  // Or / also: a DNS name whose A records are the workers (a Kubernetes
  // headless Service), "name:port", re-resolved at every health poll so
  // workers that scale in or out join and leave. A name with no records is
  // an empty answer; other lookup failures keep the last view.
  std::string workers_dns;
  // Or / also: a file with one "host:port" per line ('#' comments), re-read
  // before every poll like the DNS name (the local cluster's stand-in for a
  // headless Service). An unreadable file keeps the last view.
  std::string workers_file;
  // Replaces the DNS lookup when set (tests, other registries): called on
  // the poller thread before every poll; the discovered workers, or an
  // error to keep the last view.
  std::function<absl::StatusOr<std::vector<std::string>>()> discover;
  // Consecutive discovery answers without a worker before it is forgotten
  // (at least 1), so a DNS blip does not drop it.
  int forget_after_polls = 10;
  absl::Duration health_interval = absl::Milliseconds(500);
  // Deadline of each health check; zero: health_interval.
  absl::Duration health_timeout = absl::ZeroDuration();
  int affinity_slack = 4;
  // Credentials of the channels to the workers (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // With TLS: the name the workers' certificate must carry, when it is not
  // their address (discovered workers are IPs; a certificate names the
  // Service). Empty: the address's host.
  std::string tls_server_name;
};

class WorkerPool {
 public:
  struct Worker {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<psa::v1::Generation::Stub> stub;
  };
  using WorkerRef = std::shared_ptr<Worker>;

  WorkerPool(WorkerPoolOptions options, metrics::Registry* registry);
  ~WorkerPool();

  // The worker for a request with `affinity`, skipping `exclude` (workers
  // that already failed it); UNAVAILABLE when no healthy worker is left.
  // Counts it as outstanding until Release(). The reference keeps the
  // Worker valid even if the pool forgets it meanwhile.
  absl::StatusOr<WorkerRef> Acquire(uint64_t affinity, const std::vector<WorkerRef>& exclude);
  // Both take a worker Acquire() returned; a forgotten one is ignored.
  void Release(const Worker* worker);
  // Marks a worker unhealthy at once (a call to it failed with UNAVAILABLE);
  // the health poll brings it back when it answers again.
  void ReportFailure(const Worker* worker);
  int healthy_count();
  // Addresses of the workers in the pool (healthy or not), in pool order.
  std::vector<std::string> addresses();

 private:
  struct Entry {
    WorkerRef worker;
    bool is_static = false;  // from options_.workers: never forgotten
    bool healthy = false;
    int outstanding = 0;
    int missed = 0;  // consecutive discovery answers without it
  };
  void PollHealth();
  // Runs discovery and applies its answer: joins, misses, forgets.
  void Discover();
  // Adds a worker if new; marks it listed either way.
  void AddWorker(const std::string& address, bool is_static) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Entry* Find(const Worker* worker) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const WorkerPoolOptions options_;
  std::function<absl::StatusOr<std::vector<std::string>>()> discover_;  // null: static only
  metrics::Family<metrics::Gauge>& healthy_gauge_;
  absl::Mutex mu_;
  // A worker's gauge series exists only while its entry does (both change
  // under mu_), so a late health result cannot re-create a removed series.
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread poller_;
};

// Affinity key of a prompt: a hash of its first bytes (text, chat contents
// or token ids), so requests that share a long prefix share a key.
uint64_t PromptAffinity(const psa::v1::GenerateRequest& request);

// The addresses in a workers file: one "host:port" per line, blank lines and
// '#' comments skipped, duplicates once. NOT_FOUND if it cannot be opened.
absl::StatusOr<std::vector<std::string>> ReadWorkersFile(const std::string& path);

}  // namespace psa

#endif  // PSA_ROUTER_WORKER_POOL_H_
