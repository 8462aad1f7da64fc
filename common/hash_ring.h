// HashRing: consistent hashing of sequence ids onto KV service shards.
//
// Each shard owns many points ("virtual nodes") on a 64-bit ring; a key
// belongs to the first point at or after its hash. Adding a shard moves only
// the keys that now fall on its points (about 1/N of them); removing one
// moves only its own keys.
#ifndef PSA_COMMON_HASH_RING_H_
#define PSA_COMMON_HASH_RING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace psa {

class HashRing {
 public:
  explicit HashRing(int points_per_shard = 160) : points_per_shard_(points_per_shard) {}

  void AddShard(const std::string& name);
  void RemoveShard(const std::string& name);
  bool empty() const { return points_.empty(); }
  // The shard owning `key`; the ring must not be empty.
  const std::string& ShardFor(absl::string_view key) const;

  // A stable 64-bit hash (FNV-1a then a mixer), the same in every process,
  // so that all clients agree on placement.
  static uint64_t Hash(absl::string_view s);

 private:
  struct Point {
    uint64_t hash;
    std::string shard;
    bool operator<(const Point& o) const {
      return hash != o.hash ? hash < o.hash : shard < o.shard;
    }
  };
  const int points_per_shard_;
  std::vector<Point> points_;  // sorted
};

}  // namespace psa

#endif  // PSA_COMMON_HASH_RING_H_
