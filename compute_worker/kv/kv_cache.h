// Per-sequence KV cache, paged: positions are grouped into blocks of
// block_size tokens, and each (layer, KV head, block) is one page laid out
// as K[block_size][head_dim] then V[block_size][head_dim] (fp16). The pages
// of one (layer, block), heads in order, are the KV service's block format,
// so blocks move between the two without reshaping. Every full block
// carries metadata per KV head — the per-dimension max, min and mean of its
// keys — from which the sparse attention policies estimate a block's
// criticality without reading its keys.
//
// Two ways to hold pages:
//  - private memory (the default): every page is resident, always;
//  - a shared BlockPool (KvPaging): pages come from the worker's one budget.
//    Once the KV service stores a block (durability()), its pages become
//    evictable; an evicted page is fetched again when attention reads it,
//    through a KvPageReader. Metadata always stays resident. A page that
//    finds no room in the pool while still private (not yet stored) goes to
//    "overflow" memory outside the budget until it is stored, so prefill
//    never waits on the pool.
#ifndef PSA_COMPUTE_WORKER_KV_KV_CACHE_H_
#define PSA_COMPUTE_WORKER_KV_KV_CACHE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "compute_worker/kv/block_bounds.h"
#include "compute_worker/kv/block_pool.h"
#include "compute_worker/kv/kv_durability.h"
#include "compute_worker/kv/kv_paging.h"
#include "compute_worker/kv/kv_rows.h"
#include "compute_worker/kv/page_slab.h"

namespace psa {

class KvCache {
 public:
  static constexpr int kDefaultBlockSize = 16;
  // Pages in private memory.
  KvCache(int n_layer, int n_head_kv, int head_dim, int block_size = kDefaultBlockSize);
  // Pages in paging.pool (see above). pool and fetcher outlive the cache.
  KvCache(int n_layer, int n_head_kv, int head_dim, int block_size, KvPaging paging);
  KvCache(KvCache&&) = default;
  KvCache& operator=(KvCache&&) = default;
  // Deep copies of private-memory caches (e.g. one prefilled context reused
  // by several policies). A pool-backed cache cannot be copied.
  KvCache(const KvCache& other);
  KvCache& operator=(const KvCache& other);

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_head_kv_; }
  int head_dim() const { return head_dim_; }
  // Positions committed (visible to attention).
  int length() const { return length_; }
  // Positions with pages to write into.
  int capacity() const { return capacity_; }
  int block_size() const { return block_size_; }
  // Blocks whose block_size positions are all committed (metadata valid).
  int full_blocks() const { return length_ / block_size_; }
  // Elements (fp16) of one page: K and V of one head.
  size_t page_elements() const { return static_cast<size_t>(2) * block_size_ * head_dim_; }
  size_t page_bytes() const { return page_elements() * sizeof(uint16_t); }
  // Elements of one (layer, block): the pages of every head.
  size_t block_elements() const { return n_head_kv_ * page_elements(); }
  bool paged() const { return pooled_.paging.pool != nullptr; }

  // Makes room for `n` positions in total (keeps contents).
  void Reserve(int n);
  // Writable slot for position pos (< capacity, not yet committed) of (layer, head).
  uint16_t* KeySlot(int layer, int head, int pos) {
    return pages_[PageTable(layer, head)][pos / block_size_] +
           static_cast<size_t>(pos % block_size_) * head_dim_;
  }
  uint16_t* ValueSlot(int layer, int head, int pos) {
    return KeySlot(layer, head, pos) + static_cast<size_t>(block_size_) * head_dim_;
  }
  // The page of block b of (layer, head) if it is resident in memory this
  // cache owns (always, without a pool; else until the block is stored),
  // null otherwise — read those through a KvPageReader.
  const uint16_t* Page(int layer, int head, int b) const {
    return pages_[PageTable(layer, head)][b];
  }
  uint16_t* MutablePage(int layer, int head, int b) { return pages_[PageTable(layer, head)][b]; }
  // All pages of (layer, head), private memory only.
  KvRows Keys(int layer, int head) const {
    return KvRows{pages_[PageTable(layer, head)].data(), 0, block_size_, head_dim_};
  }
  KvRows Values(int layer, int head) const {
    return KvRows{pages_[PageTable(layer, head)].data(),
                  static_cast<size_t>(block_size_) * head_dim_, block_size_, head_dim_};
  }
  // Per-dimension max / min / mean of the keys of full block b of (layer,
  // head), fp16: the keys are fp16, so their extremes are exact; the mean
  // is their float sum in row order over block_size, rounded (the same on
  // every path that computes it). The metadata costs 3/32 of the block's
  // K+V bytes.
  const uint16_t* KeyMax(int layer, int head, int b) const {
    return kmax_[layer].data() + (static_cast<size_t>(head) * table_blocks_ + b) * head_dim_;
  }
  const uint16_t* KeyMin(int layer, int head, int b) const {
    return kmin_[layer].data() + (static_cast<size_t>(head) * table_blocks_ + b) * head_dim_;
  }
  const uint16_t* KeyMean(int layer, int head, int b) const {
    return kmean_[layer].data() + (static_cast<size_t>(head) * table_blocks_ + b) * head_dim_;
  }
  // The same metadata in 8 bits, for scoring blocks (see BlockBounds).
  const BlockBounds& KeyBounds(int layer, int head) const { return bounds_[PageTable(layer, head)]; }
  // Makes positions [0, n) visible (n <= capacity) and computes the
  // metadata of every block that became full.
  void Commit(int n);
  // Bytes of pages resident in memory this cache owns, plus metadata.
  size_t bytes() const;

  // ---- Durability (the KV service's copy) ----
  // Shared with whoever stores the cache's blocks; they call Update().
  const std::shared_ptr<KvDurability>& durability() const { return durability_; }
  // Takes in the latest Update(): blocks [0, durable_blocks()) are stored
  // under durable_id(), and their pages become evictable. Owner thread,
  // between steps (never while attention reads the cache).
  void ApplyDurability();
  const std::string& durable_id() const { return durable_id_; }
  int durable_blocks() const { return durable_blocks_; }
  // Pool-backed, empty cache: takes blocks [0, n_blocks) as stored under
  // `sequence_id` without fetching them; layer_metadata[l] holds the KV
  // service's metadata records of layer l (per block: per head, key max,
  // key min, key mean, head_dim fp16 each).
  absl::Status AdoptStored(const std::string& sequence_id, int n_blocks,
                           const std::vector<std::string>& layer_metadata);
  // Blocks the last decode step's attention read for (layer, KV head):
  // a pool-backed cache's attention prefetches about that many, since a
  // PSA budget changes little from one step to the next. Read and written
  // only by the attention task of (layer, head).
  int& ReadHint(int layer, int head) { return read_hint_[PageTable(layer, head)]; }
  // Not OK once a fetch failed: attention read garbage, the step's output
  // must be discarded. Sticky.
  absl::Status fetch_status() const;

 private:
  friend class KvPageReader;
  size_t PageTable(int layer, int head) const {
    return static_cast<size_t>(layer) * n_head_kv_ + head;
  }
  // Grows the metadata and page tables to hold `blocks` blocks.
  void GrowTables(int blocks);
  // Private memory: carves the pages of `count` blocks of `layer` out of slabs.
  void AllocatePrivateBlocks(int layer, int count);
  // Pool: a private page for block b of table t (pool slot, else overflow).
  void AllocatePooledPage(size_t t, int b);
  void SetFetchFailure(const absl::Status& s) const;

  int n_layer_, n_head_kv_, head_dim_, block_size_;
  int length_ = 0;
  int capacity_ = 0;      // positions with pages: a multiple of block_size_
  int table_blocks_ = 0;  // blocks the tables below have room for
  // [layer * n_head_kv + head][block] -> page base; null for a pooled page
  // that is evictable (read it through its handle) or not in memory.
  std::vector<std::vector<uint16_t*>> pages_;
  // Pool mode, per page: its pool allocation (if any) or overflow memory.
  // Owns them: gives them back when the cache goes (or is moved over).
  struct PooledPages {
    KvPaging paging;
    std::vector<std::vector<BlockPool::Handle>> handles;
    std::vector<std::vector<std::unique_ptr<uint16_t[]>>> overflow;
    PooledPages() = default;
    PooledPages(PooledPages&& o) noexcept { *this = std::move(o); }
    PooledPages& operator=(PooledPages&& o) noexcept;
    ~PooledPages() { Release(); }
    void Release();
  };
  PooledPages pooled_;

  std::vector<PageSlab> slabs_;  // private memory
  // Per table [layer * n_head_kv + head]: free space left in its newest
  // slab, and whether its huge slabs have begun (see AllocatePrivateBlocks).
  struct SlabCursor {
    uint16_t* next = nullptr;
    size_t left = 0;  // in pages
    bool huge = false;
  };
  std::vector<SlabCursor> slab_cursors_;
  std::vector<std::vector<uint16_t>> kmax_, kmin_, kmean_;  // per layer: [head][table_blocks][dim]
  std::vector<BlockBounds> bounds_;                 // [layer * n_head_kv + head]

  std::vector<int> read_hint_;  // [layer * n_head_kv + head]
  std::shared_ptr<KvDurability> durability_ = std::make_shared<KvDurability>();
  std::string durable_id_;
  int durable_blocks_ = 0;
  struct FetchFailure {
    absl::Mutex mu;
    absl::Status status ABSL_GUARDED_BY(mu);
  };
  std::unique_ptr<FetchFailure> fetch_failure_ = std::make_unique<FetchFailure>();
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_KV_CACHE_H_
