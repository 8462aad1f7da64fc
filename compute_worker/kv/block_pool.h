// BlockPool: one memory budget for KV pages, shared by every layer, head and
// sequence of a worker (the "unified block pool" of docs/design.md).
//
// A slot holds one page. A page starts private (only in this worker: the
// open tail of a sequence, or a block not yet written to the KV service);
// once the KV service holds it, the owner marks it evictable. When the pool
// is full, Allocate() takes the least recently used evictable page that no
// computation has pinned and reuses its slot. If every slot is private or
// pinned, Allocate() fails with RESOURCE_EXHAUSTED instead of waiting, so a
// caller can fall back (read into scratch memory) rather than deadlock.
//
// Owners hold Handles, not slots: a handle names one allocation (slot plus
// generation), so after its page is evicted and the slot reused, every call
// with the old handle is a harmless miss — TryPin() returns null, the rest
// do nothing. Owners therefore need no eviction callbacks and no locks of
// their own to notice an eviction.
//
// Thread-safe.
#ifndef PSA_COMPUTE_WORKER_KV_BLOCK_POOL_H_
#define PSA_COMPUTE_WORKER_KV_BLOCK_POOL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "absl/synchronization/mutex.h"
#include "compute_worker/kv/page_slab.h"

namespace psa {

class BlockPool {
 public:
  struct Handle {
    uint32_t slot = 0;
    uint32_t generation = 0;  // 0: no allocation
    bool valid() const { return generation != 0; }
  };

  struct Stats {
    uint64_t capacity_slots = 0;
    uint64_t used = 0;       // allocated slots
    uint64_t evictable = 0;  // of which could be evicted now (not pinned)
    uint64_t pinned = 0;
    uint64_t evictions = 0;
    uint64_t hits = 0;       // TryPin() calls that found their page
    uint64_t misses = 0;     // TryPin() calls whose page had been evicted
    double usage_ratio() const { return capacity_slots ? double(used) / capacity_slots : 0; }
  };

  // Up to capacity_bytes / page_bytes slots; memory is taken as needed.
  BlockPool(uint64_t capacity_bytes, size_t page_bytes);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  ~BlockPool();

  // A private slot (not evictable, not pinned).
  absl::StatusOr<Handle> Allocate();
  // The page of a private or pinned handle; undefined for others.
  void* data(Handle h) const { return slots_[h.slot].data; }
  size_t page_bytes() const { return page_bytes_; }
  uint64_t capacity_slots() const { return capacity_slots_; }

  // The page, pinned (not evictable until Unpin) and made most recently
  // used, or null if it was evicted.
  void* TryPin(Handle h);
  void Unpin(Handle h);
  void Unpin(absl::Span<const Handle> handles);  // each, under one lock
  // held[i] = whether handles[i]'s page is still in the pool (a snapshot:
  // it may be evicted right after). Changes no recency, counts no hit, and
  // takes no lock: selection asks this of every candidate block.
  void Holding(absl::Span<const Handle> handles, uint8_t* held) const;
  // Durable elsewhere now. `cold`: first in line for eviction (a page
  // fetched ahead but not read) instead of most recently used.
  void MarkEvictable(Handle h, bool cold = false);
  void Free(Handle h);           // the owner is done with it

  Stats stats();

 private:
  struct Slot {
    void* data = nullptr;
    bool evictable = false;
    int pins = 0;
    // Neighbours in the LRU list, link[kNewer] and link[kOlder] (slot
    // indices; kNone at the ends), valid while evictable and unpinned.
    // Intrusive: pinning and unpinning, once per page read, allocate nothing.
    uint32_t link[2] = {kNone, kNone};
  };
  static constexpr uint32_t kNone = ~0u;
  static constexpr int kNewer = 0, kOlder = 1;
  // Whether `h` is its slot's current allocation (no lock needed: a
  // snapshot); Find: that slot, or null.
  bool Current(Handle h) const;
  Slot* Find(Handle h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool InLru(const Slot& s) const { return s.evictable && s.pins == 0; }
  void UnpinLocked(Handle h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The LRU list of evictable, unpinned slots: adds a slot at its newest
  // end (kNewer) or its oldest (kOlder), or takes one out.
  void LruPush(uint32_t slot, int end) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LruRemove(uint32_t slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t page_bytes_;
  const uint64_t capacity_slots_;
  absl::Mutex mu_;
  // Addresses of slots never change; the vector is sized once.
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  // Each slot's current allocation (0 while free): written under mu_, read
  // without it by Holding(). Apart from slots_ so that those reads, one per
  // candidate block, stay within a few cache lines (4 bytes a slot).
  const std::unique_ptr<std::atomic<uint32_t>[]> generations_;
  std::vector<PageSlab> slabs_ ABSL_GUARDED_BY(mu_);
  uint64_t carved_ ABSL_GUARDED_BY(mu_) = 0;  // slots given memory so far
  uint32_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<uint32_t> free_ ABSL_GUARDED_BY(mu_);
  uint32_t lru_end_[2] ABSL_GUARDED_BY(mu_) = {kNone, kNone};  // [kNewer]: newest
  uint64_t lru_size_ ABSL_GUARDED_BY(mu_) = 0;
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_BLOCK_POOL_H_
