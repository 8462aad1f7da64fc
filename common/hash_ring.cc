#include "common/hash_ring.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace psa {

uint64_t HashRing::Hash(absl::string_view s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a offset basis
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  // splitmix64 finaliser: FNV alone clusters similar names on the ring.
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

void HashRing::AddShard(const std::string& name) {
  RemoveShard(name);
  for (int i = 0; i < points_per_shard_; ++i) {
    points_.push_back(Point{Hash(absl::StrCat(name, "#", i)), name});
  }
  std::sort(points_.begin(), points_.end());
}

void HashRing::RemoveShard(const std::string& name) {
  points_.erase(std::remove_if(points_.begin(), points_.end(),
                               [&](const Point& p) { return p.shard == name; }),
                points_.end());
}

const std::string& HashRing::ShardFor(absl::string_view key) const {
  const uint64_t h = Hash(key);
  auto it = std::lower_bound(points_.begin(), points_.end(), Point{h, std::string()});
  return it == points_.end() ? points_.front().shard : it->shard;
}

}  // namespace psa
