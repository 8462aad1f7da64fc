// BlockPool: one memory budget for KV blocks, shared by every layer and
// sequence of a worker (the "unified block pool" of DESIGN.md section 3).
//
// A slot holds one block. A block starts private (only in this worker: the
// open tail of a sequence, or a full block not yet written to the KV
// service); once the KV service holds it, the owner marks it evictable. When
// the pool is full, Allocate() evicts the least recently used evictable
// block that no computation has pinned, telling its owner through the
// callback it gave, and reuses the slot. If every slot is private or
// pinned, Allocate() fails with RESOURCE_EXHAUSTED instead of waiting, so a
// scheduler can hold back work rather than deadlock.
//
// Thread-safe. Callbacks run with the pool's lock held: they must only
// forget the slot (e.g. null a pointer), never call back into the pool.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_BLOCK_POOL_H_
#define PSA_COMPUTE_WORKER_RUNTIME_BLOCK_POOL_H_

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace psa {

class BlockPool {
 public:
  using SlotId = uint32_t;
  using OnEvict = std::function<void()>;

  struct Stats {
    uint64_t capacity_slots = 0;
    uint64_t used = 0;        // allocated slots
    uint64_t evictable = 0;   // of which could be evicted now (not pinned)
    uint64_t pinned = 0;
    uint64_t evictions = 0;
    uint64_t hits = 0;        // Touch() calls: reads served from the pool
    double usage_ratio() const { return capacity_slots ? double(used) / capacity_slots : 0; }
  };

  // Up to capacity_bytes / block_bytes slots; memory is taken as needed.
  BlockPool(uint64_t capacity_bytes, size_t block_bytes);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  ~BlockPool();

  // A private slot; `on_evict` runs if the block is later evicted.
  absl::StatusOr<SlotId> Allocate(OnEvict on_evict);
  void* data(SlotId slot) const { return slots_[slot].data; }
  size_t block_bytes() const { return block_bytes_; }

  void MarkEvictable(SlotId slot);  // durable elsewhere now
  void Pin(SlotId slot);            // being read: not evictable until Unpin
  void Unpin(SlotId slot);
  void Touch(SlotId slot);          // used: most recently used, counted as a hit
  void Free(SlotId slot);           // the owner is done with it (no callback)

  Stats stats();

 private:
  struct Slot {
    void* data = nullptr;
    bool used = false;
    bool evictable = false;
    int pins = 0;
    OnEvict on_evict;
    std::list<SlotId>::iterator lru;  // valid while evictable
  };
  void EnterLruLocked(SlotId slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LeaveLruLocked(SlotId slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool InLruLocked(SlotId slot) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t block_bytes_;
  const uint64_t capacity_slots_;
  absl::Mutex mu_;
  // Addresses of slots never change; the vector is sized once.
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<char[]>> slabs_ ABSL_GUARDED_BY(mu_);
  uint64_t carved_ ABSL_GUARDED_BY(mu_) = 0;  // slots given memory so far
  std::vector<SlotId> free_ ABSL_GUARDED_BY(mu_);
  std::list<SlotId> lru_ ABSL_GUARDED_BY(mu_);  // evictable, unpinned; front = most recent
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_BLOCK_POOL_H_
