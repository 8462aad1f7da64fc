#include "common/hash_ring.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

TEST(HashRingTest, SpreadsKeysEvenly) {
  HashRing ring;
  for (int i = 0; i < 4; ++i) ring.AddShard(absl::StrCat("10.0.0.", i, ":7100"));
  std::map<std::string, int> counts;
  constexpr int kKeys = 20000;
  for (int k = 0; k < kKeys; ++k) ++counts[ring.ShardFor(absl::StrCat("seq-", k))];
  ASSERT_EQ(counts.size(), 4u);
  for (const auto& [shard, n] : counts) {
    EXPECT_GT(n, kKeys / 4 * 0.8) << shard;
    EXPECT_LT(n, kKeys / 4 * 1.2) << shard;
  }
}

TEST(HashRingTest, AddingAShardMovesOnlyItsShare) {
  HashRing ring;
  for (int i = 0; i < 3; ++i) ring.AddShard(absl::StrCat("kv-", i));
  constexpr int kKeys = 20000;
  std::vector<std::string> before;
  for (int k = 0; k < kKeys; ++k) before.push_back(ring.ShardFor(absl::StrCat("s", k)));
  ring.AddShard("kv-3");
  int moved = 0;
  for (int k = 0; k < kKeys; ++k) {
    const std::string& now = ring.ShardFor(absl::StrCat("s", k));
    if (now != before[k]) {
      ++moved;
      EXPECT_EQ(now, "kv-3");  // keys only move to the new shard
    }
  }
  EXPECT_GT(moved, kKeys / 4 * 0.75);
  EXPECT_LT(moved, kKeys / 4 * 1.25);
  ring.RemoveShard("kv-3");
  for (int k = 0; k < kKeys; ++k) EXPECT_EQ(ring.ShardFor(absl::StrCat("s", k)), before[k]);
}

TEST(HashRingTest, HashIsPinned) {
  // Every client, in every process and build, must place sequences alike:
  // the hash is part of the protocol, so its values are fixed here.
  EXPECT_EQ(HashRing::Hash("psa"), 0xde5238b67c9d0a76ull);
  EXPECT_EQ(HashRing::Hash("conversation-1"), 0x5ecaca19f883fbe6ull);
}

}  // namespace
}  // namespace psa
