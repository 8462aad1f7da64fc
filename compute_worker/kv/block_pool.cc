#include "compute_worker/kv/block_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "compute_worker/kv/page_slab.h"

namespace psa {

BlockPool::BlockPool(uint64_t capacity_bytes, size_t page_bytes)
    : page_bytes_(page_bytes),
      capacity_slots_(page_bytes ? capacity_bytes / page_bytes : 0),
      slots_(capacity_slots_),
      generations_(new std::atomic<uint32_t>[capacity_slots_]()) {
  stats_.capacity_slots = capacity_slots_;
}

BlockPool::~BlockPool() = default;

bool BlockPool::Current(Handle h) const {
  return h.valid() && h.slot < capacity_slots_ &&
         generations_[h.slot].load(std::memory_order_relaxed) == h.generation;
}

BlockPool::Slot* BlockPool::Find(Handle h) { return Current(h) ? &slots_[h.slot] : nullptr; }

void BlockPool::LruPush(uint32_t slot, int end) {
  const int away = 1 - end;  // the direction from `end` into the list
  Slot& s = slots_[slot];
  s.link[end] = kNone;
  s.link[away] = lru_end_[end];
  if (lru_end_[end] != kNone) slots_[lru_end_[end]].link[end] = slot;
  lru_end_[end] = slot;
  if (lru_end_[away] == kNone) lru_end_[away] = slot;
  ++lru_size_;
}

void BlockPool::LruRemove(uint32_t slot) {
  Slot& s = slots_[slot];
  for (int d : {kNewer, kOlder}) {
    // The neighbour on side d (or that end of the list) now links past s.
    (s.link[d] != kNone ? slots_[s.link[d]].link[1 - d] : lru_end_[d]) = s.link[1 - d];
  }
  s.link[kNewer] = s.link[kOlder] = kNone;
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
  } else if (lru_end_[kOlder] != kNone) {
    slot = lru_end_[kOlder];  // least recently used; its handle goes stale below
    LruRemove(slot);
    --stats_.used;
    ++stats_.evictions;
  } else {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the block pool is full: all ", capacity_slots_,
        " slots hold pages that are pinned or not yet in the KV service"));
  }
  Slot& s = slots_[slot];
  const uint32_t generation = next_generation_++;
  if (next_generation_ == 0) next_generation_ = 1;  // 0 means "no allocation"
  generations_[slot].store(generation, std::memory_order_relaxed);
  s.evictable = false;
  s.pins = 0;
  ++stats_.used;
  return Handle{slot, generation};
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

void BlockPool::Holding(absl::Span<const Handle> handles, uint8_t* held) const {
  for (size_t i = 0; i < handles.size(); ++i) held[i] = Current(handles[i]);
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
    LruPush(h.slot, kNewer);
  }
}

void BlockPool::MarkEvictable(Handle h, bool cold) {
  absl::MutexLock lock(&mu_);
  Slot* s = Find(h);
  if (s == nullptr || s->evictable) return;
  s->evictable = true;
  if (s->pins == 0) {
    LruPush(h.slot, cold ? kOlder : kNewer);
  }
}

void BlockPool::Free(Handle h) {
  absl::MutexLock lock(&mu_);
  Slot* s = Find(h);
  if (s == nullptr) return;
  if (InLru(*s)) LruRemove(h.slot);
  generations_[h.slot].store(0, std::memory_order_relaxed);
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
  for (size_t i = 0; i < slots_.size(); ++i) {
    s.pinned += generations_[i].load(std::memory_order_relaxed) != 0 && slots_[i].pins > 0;
  }
  return s;
}

}  // namespace psa
