// BlockStore's bookkeeping of what may be freed: the LRU order of
// sequences, leases that pin them, the reference counts of content-shared
// blocks, and eviction when a write needs room (see block_store.h).
#include "kv_service/block_store.h"

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"

namespace psa {

void BlockStore::TouchLocked(Sequence* seq) {
  lru_.splice(lru_.begin(), lru_, seq->lru);
}

bool BlockStore::LeasedLocked(Sequence* seq) {
  const absl::Time now = options_.now();
  for (auto it = seq->leases.begin(); it != seq->leases.end();) {
    if (it->second <= now) {
      seq->leases.erase(it++);
    } else {
      ++it;
    }
  }
  return !seq->leases.empty();
}

absl::Status BlockStore::MakeRoomLocked(uint64_t needed, const Sequence* keep) {
  if (bytes_stored_ + needed <= options_.capacity_bytes) return absl::OkStatus();
  // Plan first: simulate reference drops of LRU candidates (oldest first).
  absl::flat_hash_map<const Block*, uint64_t> drops;
  std::vector<std::string> victims;
  uint64_t freeable = 0;
  for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
    if (bytes_stored_ - freeable + needed <= options_.capacity_bytes) break;
    Sequence* seq = FindLocked(*it);
    if (seq == keep || LeasedLocked(seq)) continue;
    victims.push_back(*it);
    for (const auto& layer : seq->layers) {
      for (const BlockRef& b : layer) {
        if (++drops[b.get()] == EntryLocked(b)->refs) freeable += b->bytes();
      }
    }
  }
  if (bytes_stored_ - freeable + needed > options_.capacity_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV store is full: ", bytes_stored_, " of ", options_.capacity_bytes,
        " bytes held, this write needs ", needed,
        " more and leased or in-use sequences cannot be evicted; release sequences, "
        "end leases or raise --capacity"));
  }
  for (const std::string& id : victims) {
    RemoveLocked(id);
    ++evictions_;
  }
  return absl::OkStatus();
}

BlockStore::ContentEntry* BlockStore::EntryLocked(const BlockRef& block) {
  for (ContentEntry& e : content_.find(block->hash)->second) {
    if (e.block == block) return &e;
  }
  return nullptr;  // unreachable: every stored block has an entry
}

void BlockStore::UnrefLocked(const BlockRef& block, uint64_t* freed) {
  ContentEntry* entry = EntryLocked(block);
  if (--entry->refs > 0) return;
  *freed += block->bytes();
  bytes_stored_ -= block->bytes();
  --unique_blocks_;
  auto bucket = content_.find(block->hash);
  auto& entries = bucket->second;
  entries.erase(entries.begin() + (entry - entries.data()));
  if (entries.empty()) content_.erase(bucket);
}

uint64_t BlockStore::RemoveLocked(const std::string& id) {
  auto it = sequences_.find(id);
  uint64_t freed = 0;
  for (const auto& layer : it->second->layers) {
    for (const BlockRef& b : layer) {
      UnrefLocked(b, &freed);
      --blocks_;
    }
  }
  lru_.erase(it->second->lru);
  sequences_.erase(it);
  return freed;
}

absl::StatusOr<LeaseResult> BlockStore::Lease(const std::string& id, uint64_t lease_id,
                                              absl::Duration ttl) {
  if (ttl < absl::ZeroDuration()) return absl::InvalidArgumentError("ttl is negative");
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindLocked(id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "sequence \"", id, "\" is not stored (never opened, released or evicted)"));
  }
  LeasedLocked(seq);  // drops expired leases
  if (lease_id != 0 && !seq->leases.contains(lease_id)) {
    return absl::NotFoundError(absl::StrCat(
        "lease ", lease_id, " on \"", id, "\" does not exist or has expired; take a new one"));
  }
  if (ttl == absl::ZeroDuration()) {
    if (lease_id == 0) return absl::InvalidArgumentError("ttl_ms is 0 and no lease_id to end");
    seq->leases.erase(lease_id);
    return LeaseResult{0, options_.now()};
  }
  if (lease_id == 0) lease_id = next_lease_id_++;
  const absl::Time expires = options_.now() + ttl;
  seq->leases[lease_id] = expires;
  TouchLocked(seq);
  return LeaseResult{lease_id, expires};
}

absl::StatusOr<uint64_t> BlockStore::Release(const std::string& id) {
  absl::MutexLock lock(&mu_);
  if (FindLocked(id) == nullptr) {
    return absl::NotFoundError(absl::StrCat("sequence \"", id, "\" is not stored"));
  }
  return RemoveLocked(id);
}

}  // namespace psa
