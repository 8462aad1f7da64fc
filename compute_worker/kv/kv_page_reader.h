// KvPageReader: how attention reads the pages of one (layer, KV head) of a
// cache during one step.
//
// Without a pool it hands out the cache's own pages at no cost. With one, a
// page the cache does not hold in its own memory is pinned in the pool if
// still there (a hit), else fetched from the KV service into a pool slot,
// or into scratch memory when every slot is pinned or private (correct,
// just not cached). Prefetch() starts fetches early, so the transfer of the
// next blocks overlaps the computation of the current ones; Page() waits
// only for what has not arrived, and that wait is counted as stall time.
//
// Pages stay readable until the reader is destroyed, which unpins them and
// leaves fetched ones in the pool as evictable. A failed fetch marks the
// cache (KvCache::fetch_status) and its pages read as zeros.
//
// One reader per (cache, layer, head) at a time: it updates that table of
// the cache. Not thread-safe.
#ifndef PSA_COMPUTE_WORKER_KV_KV_PAGE_READER_H_
#define PSA_COMPUTE_WORKER_KV_KV_PAGE_READER_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "compute_worker/kv/kv_cache.h"

namespace psa {

class KvPageReader {
 public:
  // Blocks per fetch request.
  static constexpr int kMaxBlocksPerFetch = 32;

  KvPageReader(KvCache& kv, int layer, int kv_head);
  KvPageReader(const KvPageReader&) = delete;
  KvPageReader& operator=(const KvPageReader&) = delete;
  ~KvPageReader();

  // Starts making blocks' pages readable (no-op without a pool).
  void Prefetch(absl::Span<const int> blocks);
  // resident[i] = whether block first + i can be read without a fetch
  // (always, without a pool; else a snapshot of the pool).
  void Resident(int first, int n, uint8_t* resident) const;
  // Block b's page if it can be read now without waiting (private, or a
  // pool hit that Prefetch() pinned), else null: for CPU prefetches.
  const uint16_t* PageIfReady(int b) const {
    return paged_ ? (waiting_[b] ? nullptr : ptr_[b]) : direct_[b];
  }
  // Block b's page (K then V), waiting for it if it is being fetched.
  const uint16_t* Page(int b) { return paged_ ? WaitPage(b) : direct_[b]; }
  // Rows over every block Page() was called for.
  KvRows Keys() const;
  KvRows Values() const;

 private:
  const uint16_t* WaitPage(int b);

  KvCache& kv_;  // its page table (layer, kv_head) is this reader's to update
  const int layer_, kv_head_;
  const size_t table_;
  const bool paged_;
  const uint16_t* const* direct_ = nullptr;  // no pool: the cache's pages

  // Pool mode. ptr_[b]: where block b's page is (readable once it arrived).
  std::vector<uint16_t*> ptr_;
  std::vector<uint8_t> waiting_;  // requested and not yet seen arrived
  std::vector<BlockPool::Handle> pinned_;   // hits: unpin at the end
  // Fetched into the pool (evictable at the end), and the block of each.
  std::vector<BlockPool::Handle> fetched_;
  std::vector<int> fetched_block_;
  std::vector<std::unique_ptr<uint16_t[]>> scratch_;

  absl::Mutex mu_;
  std::vector<uint8_t> arrived_ ABSL_GUARDED_BY(mu_);
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_KV_PAGE_READER_H_
