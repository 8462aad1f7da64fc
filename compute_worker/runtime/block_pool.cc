#include "compute_worker/runtime/block_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace psa {
namespace {

constexpr size_t kSlabBytes = 2 << 20;

}  // namespace

BlockPool::BlockPool(uint64_t capacity_bytes, size_t block_bytes)
    : block_bytes_(block_bytes),
      capacity_slots_(block_bytes ? capacity_bytes / block_bytes : 0),
      slots_(capacity_slots_) {
  stats_.capacity_slots = capacity_slots_;
}

BlockPool::~BlockPool() = default;

bool BlockPool::InLruLocked(SlotId slot) const {
  const Slot& s = slots_[slot];
  return s.used && s.evictable && s.pins == 0;
}

void BlockPool::EnterLruLocked(SlotId slot) {
  lru_.push_front(slot);
  slots_[slot].lru = lru_.begin();
}

void BlockPool::LeaveLruLocked(SlotId slot) { lru_.erase(slots_[slot].lru); }

absl::StatusOr<BlockPool::SlotId> BlockPool::Allocate(OnEvict on_evict) {
  absl::MutexLock lock(&mu_);
  SlotId slot;
  if (!free_.empty()) {
    slot = free_.back();
    free_.pop_back();
  } else if (carved_ < capacity_slots_) {
    // Give memory to the next slots from a new slab.
    const size_t per_slab = std::max<size_t>(1, kSlabBytes / block_bytes_);
    const size_t n = std::min<uint64_t>(per_slab, capacity_slots_ - carved_);
    slabs_.emplace_back(new char[n * block_bytes_]);
    for (size_t i = 0; i < n; ++i) {
      slots_[carved_ + i].data = slabs_.back().get() + i * block_bytes_;
      if (i > 0) free_.push_back(carved_ + i);
    }
    slot = carved_;
    carved_ += n;
  } else if (!lru_.empty()) {
    slot = lru_.back();  // least recently used
    lru_.pop_back();
    Slot& victim = slots_[slot];
    if (victim.on_evict) victim.on_evict();
    victim.evictable = false;
    --stats_.used;
    ++stats_.evictions;
  } else {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the block pool is full: all ", capacity_slots_,
        " slots hold blocks that are pinned or not yet in the KV service"));
  }
  Slot& s = slots_[slot];
  s.used = true;
  s.evictable = false;
  s.pins = 0;
  s.on_evict = std::move(on_evict);
  ++stats_.used;
  return slot;
}

void BlockPool::MarkEvictable(SlotId slot) {
  absl::MutexLock lock(&mu_);
  Slot& s = slots_[slot];
  if (!s.used || s.evictable) return;
  s.evictable = true;
  if (s.pins == 0) EnterLruLocked(slot);
}

void BlockPool::Pin(SlotId slot) {
  absl::MutexLock lock(&mu_);
  if (InLruLocked(slot)) LeaveLruLocked(slot);
  ++slots_[slot].pins;
}

void BlockPool::Unpin(SlotId slot) {
  absl::MutexLock lock(&mu_);
  Slot& s = slots_[slot];
  if (s.pins == 0) return;
  --s.pins;
  if (InLruLocked(slot)) EnterLruLocked(slot);
}

void BlockPool::Touch(SlotId slot) {
  absl::MutexLock lock(&mu_);
  ++stats_.hits;
  if (InLruLocked(slot)) lru_.splice(lru_.begin(), lru_, slots_[slot].lru);
}

void BlockPool::Free(SlotId slot) {
  absl::MutexLock lock(&mu_);
  Slot& s = slots_[slot];
  if (!s.used) return;
  if (InLruLocked(slot)) LeaveLruLocked(slot);
  s = Slot{s.data};
  free_.push_back(slot);
  --stats_.used;
}

BlockPool::Stats BlockPool::stats() {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.evictable = lru_.size();
  s.pinned = 0;
  for (const Slot& slot : slots_) s.pinned += slot.used && slot.pins > 0;
  return s;
}

}  // namespace psa
