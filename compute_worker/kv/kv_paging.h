// KvPaging: what a pool-backed KvCache is given — the worker's one block
// pool, the fetcher that copies evicted pages back, and the counters all
// such caches add to. The pool and fetcher outlive every cache using them;
// the counters are atomics, safe from any thread.
#ifndef PSA_COMPUTE_WORKER_KV_KV_PAGING_H_
#define PSA_COMPUTE_WORKER_KV_KV_PAGING_H_

#include <atomic>
#include <cstdint>

#include "compute_worker/kv/block_pool.h"
#include "compute_worker/kv/page_fetcher.h"

namespace psa {

// What pool-backed caches did, summed over all of them (for metrics).
struct KvPagingCounters {
  std::atomic<uint64_t> page_reads{0};     // durable pages attention asked for
  std::atomic<uint64_t> page_fetches{0};   // of which came from the KV service
  std::atomic<uint64_t> unread_fetches{0}; // fetched ahead, never read by that step
  std::atomic<uint64_t> fetch_bytes{0};
  std::atomic<uint64_t> stall_ns{0};       // attention waiting for fetched pages
  std::atomic<uint64_t> scratch_pages{0};  // fetched pages the full pool could not keep
  std::atomic<int64_t> overflow_pages{0};  // private pages outside the pool, now
};

struct KvPaging {
  BlockPool* pool = nullptr;  // page_bytes must equal KvCache::page_bytes()
  PageFetcher* fetcher = nullptr;
  KvPagingCounters* counters = nullptr;  // optional
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_KV_PAGING_H_
