// KvPoolMetrics: the unified block pool and on-demand page fetching as
// Prometheus metrics, read from BlockPool::stats() and KvPagingCounters at
// every scrape. Pool hit ratio = 1 - rate(page_fetches) / rate(page_reads).
#ifndef PSA_COMPUTE_WORKER_SERVER_KV_POOL_METRICS_H_
#define PSA_COMPUTE_WORKER_SERVER_KV_POOL_METRICS_H_

#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "compute_worker/kv/block_pool.h"
#include "compute_worker/kv/kv_cache.h"

namespace psa {

class KvPoolMetrics {
 public:
  // `pool` and `counters` outlive the registry's scrapes.
  KvPoolMetrics(metrics::Registry* registry, BlockPool* pool, const KvPagingCounters* counters);

 private:
  void Collect();

  BlockPool* const pool_;
  const KvPagingCounters* const counters_;
  metrics::Gauge &capacity_bytes_, &used_bytes_, &usage_, &vllm_usage_, &pinned_, &overflow_;
  metrics::Counter &evictions_, &reads_, &fetches_, &unread_, &fetch_bytes_, &stall_seconds_,
      &scratch_;
  absl::Mutex mu_;
  // Totals already added to the seven counters above (they only go up).
  static constexpr int kTotals = 7;
  uint64_t seen_[kTotals] ABSL_GUARDED_BY(mu_) = {};
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_KV_POOL_METRICS_H_
