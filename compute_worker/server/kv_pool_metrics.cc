#include "compute_worker/server/kv_pool_metrics.h"

namespace psa {

KvPoolMetrics::KvPoolMetrics(metrics::Registry* r, BlockPool* pool,
                             const KvPagingCounters* counters)
    : pool_(pool),
      counters_(counters),
      capacity_bytes_(r->AddGauge("psa_worker_kv_pool_capacity_bytes",
                                  "Memory budget of the worker's unified KV block pool")
                          .Add()),
      used_bytes_(r->AddGauge("psa_worker_kv_pool_used_bytes",
                              "KV block pool memory holding pages").Add()),
      usage_(r->AddGauge("psa_worker_kv_pool_usage_ratio",
                         "Fraction of the KV block pool holding pages (0-1)").Add()),
      vllm_usage_(r->AddGauge("vllm:kv_cache_usage_perc",
                              "KV cache usage, 0-1 (vLLM's name; same as "
                              "psa_worker_kv_pool_usage_ratio)").Add()),
      pinned_(r->AddGauge("psa_worker_kv_pool_pinned_pages",
                          "Pool pages pinned by attention computing now").Add()),
      overflow_(r->AddGauge("psa_worker_kv_pool_overflow_pages",
                            "Pages not yet in the KV service that found no pool slot "
                            "(held outside the budget until stored)").Add()),
      evictions_(r->AddCounter("psa_worker_kv_pool_evictions_total",
                               "Pool pages evicted to make room").Add()),
      reads_(r->AddCounter("psa_worker_kv_page_reads_total",
                           "Stored KV pages attention read (hits + fetches)").Add()),
      fetches_(r->AddCounter("psa_worker_kv_page_fetches_total",
                             "KV pages fetched from the KV service (pool misses)").Add()),
      unread_(r->AddCounter("psa_worker_kv_page_fetches_unread_total",
                            "Fetched KV pages the attention step that asked for them never "
                            "read (fetched ahead of a budget that stopped short)").Add()),
      fetch_bytes_(r->AddCounter("psa_worker_kv_page_fetch_bytes_total",
                                 "Bytes of KV pages fetched on demand").Add()),
      stall_seconds_(r->AddCounter("psa_worker_kv_fetch_stall_seconds_total",
                                   "Time attention waited for fetched KV pages (summed over "
                                   "compute threads)").Add()),
      scratch_(r->AddCounter("psa_worker_kv_pool_scratch_pages_total",
                             "Fetched pages the pool had no room to keep").Add()) {
  capacity_bytes_.Set(static_cast<double>(pool->capacity_slots() * pool->page_bytes()));
  r->AddCollector([this] { Collect(); });
}

void KvPoolMetrics::Collect() {
  const BlockPool::Stats s = pool_->stats();
  used_bytes_.Set(static_cast<double>(s.used * pool_->page_bytes()));
  usage_.Set(s.usage_ratio());
  vllm_usage_.Set(s.usage_ratio());
  pinned_.Set(static_cast<double>(s.pinned));
  overflow_.Set(static_cast<double>(counters_->overflow_pages.load()));
  // Counters mirror totals kept elsewhere: add what they grew by.
  const struct {
    metrics::Counter& counter;
    uint64_t total;
    double unit;
  } totals[kTotals] = {
      {evictions_, s.evictions, 1},
      {reads_, counters_->page_reads.load(), 1},
      {fetches_, counters_->page_fetches.load(), 1},
      {unread_, counters_->unread_fetches.load(), 1},
      {fetch_bytes_, counters_->fetch_bytes.load(), 1},
      {stall_seconds_, counters_->stall_ns.load(), 1e-9},
      {scratch_, counters_->scratch_pages.load(), 1},
  };
  absl::MutexLock lock(&mu_);
  for (int i = 0; i < kTotals; ++i) {
    if (totals[i].total <= seen_[i]) continue;
    totals[i].counter.Increment(static_cast<double>(totals[i].total - seen_[i]) * totals[i].unit);
    seen_[i] = totals[i].total;
  }
}

}  // namespace psa
