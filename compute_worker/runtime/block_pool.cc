#include "compute_worker/runtime/block_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "compute_worker/runtime/page_slab.h"

namespace psa {

BlockPool::BlockPool(uint64_t capacity_bytes, size_t page_bytes)
    : page_bytes_(page_bytes),
      capacity_slots_(page_bytes ? capacity_bytes / page_bytes : 0),
      slots_(capacity_slots_) {
  stats_.capacity_slots = capacity_slots_;
}

BlockPool::~BlockPool() = default;

BlockPool::Slot* BlockPool::Find(Handle h) {
  if (!h.valid() || h.slot >= slots_.size()) return nullptr;
  Slot& s = slots_[h.slot];
  return s.generation == h.generation ? &s : nullptr;
}

void BlockPool::LruPushNewest(uint32_t slot) {
  Slot& s = slots_[slot];
  s.newer = kNone;
  s.older = lru_newest_;
  if (lru_newest_ != kNone) slots_[lru_newest_].newer = slot;
  lru_newest_ = slot;
  if (lru_oldest_ == kNone) lru_oldest_ = slot;
  ++lru_size_;
}

void BlockPool::LruPushOldest(uint32_t slot) {
  Slot& s = slots_[slot];
  s.older = kNone;
  s.newer = lru_oldest_;
  if (lru_oldest_ != kNone) slots_[lru_oldest_].older = slot;
  lru_oldest_ = slot;
  if (lru_newest_ == kNone) lru_newest_ = slot;
  ++lru_size_;
}

void BlockPool::LruRemove(uint32_t slot) {
  Slot& s = slots_[slot];
  (s.newer != kNone ? slots_[s.newer].older : lru_newest_) = s.older;
  (s.older != kNone ? slots_[s.older].newer : lru_oldest_) = s.newer;
  s.newer = s.older = kNone;
  --lru_size_;
}

absl::StatusOr<BlockPool::Handle> BlockPool::Allocate() {
  absl::MutexLock lock(&mu_);
  uint32_t slot;
  if (!free_.empty()) {
    slot = free_.back();
    free_.pop_back();
  } else if (carved_ < capacity_slots_) {
    // Give memory to the next slots from a new slab.
    const size_t per_slab = std::max<size_t>(1, kPageSlabBytes / page_bytes_);
    const size_t n = std::min<uint64_t>(per_slab, capacity_slots_ - carved_);
    slabs_.push_back(AllocatePageSlab(n == per_slab ? std::max(kPageSlabBytes, page_bytes_)
                                                    : n * page_bytes_));
    for (size_t i = 0; i < n; ++i) {
      slots_[carved_ + i].data = slabs_.back().get() + i * page_bytes_;
      if (i > 0) free_.push_back(carved_ + i);
    }
    slot = carved_;
    carved_ += n;
  } else if (lru_oldest_ != kNone) {
    slot = lru_oldest_;  // least recently used; its handle goes stale below
    LruRemove(slot);
    --stats_.used;
    ++stats_.evictions;
  } else {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the block pool is full: all ", capacity_slots_,
        " slots hold pages that are pinned or not yet in the KV service"));
  }
  Slot& s = slots_[slot];
  s.generation = next_generation_++;
  if (next_generation_ == 0) next_generation_ = 1;  // 0 means "no allocation"
  s.evictable = false;
  s.pins = 0;
  ++stats_.used;
  return Handle{slot, s.generation};
}

void* BlockPool::TryPin(Handle h) {
  absl::MutexLock lock(&mu_);
  Slot* s = Find(h);
  if (s == nullptr) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  if (InLru(*s)) LruRemove(h.slot);
  ++s->pins;
  return s->data;
}

void BlockPool::Holding(absl::Span<const Handle> handles, uint8_t* held) {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < handles.size(); ++i) held[i] = Find(handles[i]) != nullptr;
}

void BlockPool::Unpin(Handle h) {
  absl::MutexLock lock(&mu_);
  UnpinLocked(h);
}

void BlockPool::Unpin(absl::Span<const Handle> handles) {
  absl::MutexLock lock(&mu_);
  for (Handle h : handles) UnpinLocked(h);
}

void BlockPool::UnpinLocked(Handle h) {
  Slot* s = Find(h);
  if (s == nullptr || s->pins == 0) return;
  if (--s->pins == 0 && s->evictable) {
    LruPushNewest(h.slot);
  }
}

void BlockPool::MarkEvictable(Handle h, bool cold) {
  absl::MutexLock lock(&mu_);
  Slot* s = Find(h);
  if (s == nullptr || s->evictable) return;
  s->evictable = true;
  if (s->pins == 0) {
    if (cold) {
      LruPushOldest(h.slot);
    } else {
      LruPushNewest(h.slot);
    }
  }
}

void BlockPool::Free(Handle h) {
  absl::MutexLock lock(&mu_);
  Slot* s = Find(h);
  if (s == nullptr) return;
  if (InLru(*s)) LruRemove(h.slot);
  s->generation = 0;
  s->evictable = false;
  s->pins = 0;
  free_.push_back(h.slot);
  --stats_.used;
}

BlockPool::Stats BlockPool::stats() {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.evictable = lru_size_;
  s.pinned = 0;
  for (const Slot& slot : slots_) s.pinned += slot.generation != 0 && slot.pins > 0;
  return s;
}

}  // namespace psa
