// An in-process stand-in for the KV service, for benchmarks and tests of
// pool-backed caches: pages are copied from a private cache that holds the
// same tokens.
#ifndef PSA_COMPUTE_WORKER_KV_CACHE_PAGE_FETCHER_H_
#define PSA_COMPUTE_WORKER_KV_CACHE_PAGE_FETCHER_H_

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "compute_worker/kv/kv_cache.h"

namespace psa {

class CachePageFetcher : public PageFetcher {
 public:
  // `store` (private memory) outlives the fetcher.
  explicit CachePageFetcher(const KvCache& store) : store_(store) {}
  // Copies the pages, then calls `done` on the calling thread.
  void FetchPages(const std::string& sequence_id, int layer, int kv_head, std::vector<int> blocks,
                  std::vector<uint16_t*> dsts, std::function<void(absl::Status)> done) override;
  int requests() const { return requests_.load(); }  // FetchPages calls so far

 private:
  const KvCache& store_;
  std::atomic<int> requests_{0};
};

// A copy of private cache `store` backed by paging.pool, with every full
// block marked stored: pages the pool gives up come back through
// paging.fetcher (a CachePageFetcher of `store`).
KvCache PooledCopy(const KvCache& store, KvPaging paging);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_CACHE_PAGE_FETCHER_H_
