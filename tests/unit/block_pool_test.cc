#include "compute_worker/runtime/block_pool.h"

#include <atomic>
#include <cstring>
#include <thread>

#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr size_t kBlock = 12288;

TEST(BlockPoolTest, EvictsLeastRecentlyUsedDurableUnpinnedBlocks) {
  BlockPool pool(4 * kBlock, kBlock);
  std::vector<int> evicted;
  std::vector<BlockPool::SlotId> slots;
  for (int i = 0; i < 4; ++i) {
    auto s = pool.Allocate([&evicted, i] { evicted.push_back(i); });
    ASSERT_TRUE(s.ok()) << s.status();
    std::memset(pool.data(*s), i, kBlock);  // memory is really there
    slots.push_back(*s);
  }
  // Full, and everything private: refused, nothing evicted.
  EXPECT_EQ(pool.Allocate(nullptr).status().code(), absl::StatusCode::kResourceExhausted);
  for (auto s : slots) pool.MarkEvictable(s);  // LRU order now 3 2 1 0 (0 oldest)
  pool.Touch(slots[0]);                        // 0 becomes the most recent
  pool.Pin(slots[1]);                          // 1 is being read
  auto a = pool.Allocate(nullptr);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(evicted, std::vector<int>({2}));  // the oldest evictable, unpinned one
  EXPECT_EQ(*a, slots[2]);                    // its slot is reused
  auto b = pool.Allocate(nullptr);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(evicted, std::vector<int>({2, 3}));
  auto c = pool.Allocate(nullptr);
  EXPECT_EQ(evicted, std::vector<int>({2, 3, 0}));
  // Only the pinned block is left among the old ones: refused, not evicted.
  EXPECT_EQ(pool.Allocate(nullptr).status().code(), absl::StatusCode::kResourceExhausted);
  pool.Unpin(slots[1]);
  EXPECT_TRUE(pool.Allocate(nullptr).ok());
  EXPECT_EQ(evicted, std::vector<int>({2, 3, 0, 1}));
  const BlockPool::Stats st = pool.stats();
  EXPECT_EQ(st.capacity_slots, 4u);
  EXPECT_EQ(st.used, 4u);
  EXPECT_EQ(st.evictions, 4u);
  EXPECT_EQ(st.hits, 1u);
  EXPECT_DOUBLE_EQ(st.usage_ratio(), 1.0);
}

TEST(BlockPoolTest, FreeReturnsSlotsWithoutCallbacks) {
  BlockPool pool(2 * kBlock, kBlock);
  bool called = false;
  auto a = pool.Allocate([&] { called = true; });
  auto b = pool.Allocate(nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  pool.MarkEvictable(*a);
  pool.Free(*a);
  EXPECT_FALSE(called);
  EXPECT_EQ(pool.stats().used, 1u);
  EXPECT_EQ(pool.stats().evictable, 0u);
  auto c = pool.Allocate(nullptr);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, *a);
  EXPECT_EQ(pool.stats().evictions, 0u);
}

TEST(BlockPoolTest, ManyThreadsNeverExceedTheBudgetOrShareASlot) {
  constexpr int kSlots = 64;
  BlockPool pool(kSlots * kBlock, kBlock);
  std::vector<std::atomic<int>> owners(kSlots);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        auto s = pool.Allocate(nullptr);
        if (!s.ok()) continue;  // full of private blocks for a moment
        if (owners[*s].fetch_add(1) != 0) ++errors;  // someone else holds it
        pool.Pin(*s);
        static_cast<char*>(pool.data(*s))[0] = static_cast<char>(t);
        pool.Unpin(*s);
        owners[*s].fetch_sub(1);
        if (i % 2) {
          pool.MarkEvictable(*s);  // left for eviction
        } else {
          pool.Free(*s);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_LE(pool.stats().used, static_cast<uint64_t>(kSlots));
}

}  // namespace
}  // namespace psa
