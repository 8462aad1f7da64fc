// WorkerPool: the router's view of its compute workers — health (polled
// over grpc.health.v1), load (requests the router has outstanding on each)
// and the dispatch policy.
//
// Policy: requests carry an affinity key (a hash of their prompt's start).
// Each key has a preferred worker by rendezvous hashing over the healthy
// workers, so requests sharing a prefix land where its KV was last computed
// and adding or losing a worker moves only its share of keys. The preferred
// worker is taken unless it has more than `affinity_slack` requests
// outstanding beyond the least loaded healthy worker; then the least loaded
// one is.
#ifndef PSA_ROUTER_WORKER_POOL_H_
#define PSA_ROUTER_WORKER_POOL_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace psa {

struct WorkerPoolOptions {
  std::vector<std::string> workers;                    // host:port each
  // Or / also: a DNS name whose A records are the workers (a Kubernetes
  // headless Service), "name:port", re-resolved at every health poll so
  // workers that scale in or out join and leave.
  std::string workers_dns;
  absl::Duration health_interval = absl::Milliseconds(500);
  int affinity_slack = 4;
};

class WorkerPool {
 public:
  struct Worker {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<psa::v1::Generation::Stub> stub;
  };

  WorkerPool(WorkerPoolOptions options, metrics::Registry* registry);
  ~WorkerPool();

  // The worker for a request with `affinity`, skipping `exclude` (workers
  // that already failed it); UNAVAILABLE when no healthy worker is left.
  // Counts it as outstanding until Release().
  absl::StatusOr<Worker*> Acquire(uint64_t affinity, const std::vector<Worker*>& exclude);
  void Release(Worker* worker);
  // Marks a worker unhealthy at once (a call to it failed with UNAVAILABLE);
  // the health poll brings it back when it answers again.
  void ReportFailure(Worker* worker);
  int healthy_count();

 private:
  struct State {
    bool healthy = false;
    int outstanding = 0;
  };
  void PollHealth();
  // Adds a worker if new (workers are never deleted: relays hold pointers;
  // one that disappears from DNS just stays unhealthy).
  void AddWorker(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResolveDns();

  const WorkerPoolOptions options_;
  std::vector<std::unique_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> listed_ ABSL_GUARDED_BY(mu_);  // still in the DNS answer (or static)
  metrics::Family<metrics::Gauge>& healthy_gauge_;
  absl::Mutex mu_;
  std::vector<State> state_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread poller_;
};

// Affinity key of a prompt: a hash of its first bytes (text, chat contents
// or token ids), so requests that share a long prefix share a key.
uint64_t PromptAffinity(const psa::v1::GenerateRequest& request);

}  // namespace psa

#endif  // PSA_ROUTER_WORKER_POOL_H_
