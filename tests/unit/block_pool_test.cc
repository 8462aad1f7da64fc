#include "compute_worker/kv/block_pool.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>

#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr size_t kPage = 4096;

TEST(BlockPoolTest, EvictsLeastRecentlyUsedDurableUnpinnedPages) {
  BlockPool pool(4 * kPage, kPage);
  std::vector<BlockPool::Handle> pages;
  for (int i = 0; i < 4; ++i) {
    auto h = pool.Allocate();
    ASSERT_TRUE(h.ok()) << h.status();
    std::memset(pool.data(*h), i, kPage);  // memory is really there
    pages.push_back(*h);
  }
  // Full, and everything private: refused, nothing evicted.
  EXPECT_EQ(pool.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  for (auto h : pages) pool.MarkEvictable(h);  // LRU order now 3 2 1 0 (0 oldest)
  ASSERT_NE(pool.TryPin(pages[0]), nullptr);   // 0 becomes the most recent ...
  pool.Unpin(pages[0]);
  ASSERT_NE(pool.TryPin(pages[1]), nullptr);   // ... 1 is being read
  auto a = pool.Allocate();
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->slot, pages[2].slot);  // the oldest evictable, unpinned one is reused
  EXPECT_EQ(pool.TryPin(pages[2]), nullptr);  // and its old handle is stale
  pool.Unpin(pages[2]);                       // harmless
  pool.Free(pages[2]);                        // harmless: does not free *a
  EXPECT_EQ(pool.stats().used, 4u);
  ASSERT_TRUE(pool.Allocate().ok());  // evicts 3
  ASSERT_TRUE(pool.Allocate().ok());  // evicts 0
  // Holding() agrees with TryPin, and knows no handle that was never given.
  const std::vector<BlockPool::Handle> asked = {pages[0], pages[1], pages[2], pages[3], *a,
                                                BlockPool::Handle{}, BlockPool::Handle{99, 1}};
  uint8_t held[7];
  pool.Holding(asked, held);
  EXPECT_EQ(std::vector<uint8_t>(held, held + 7), (std::vector<uint8_t>{0, 1, 0, 0, 1, 0, 0}));
  EXPECT_EQ(pool.TryPin(pages[3]), nullptr);
  EXPECT_EQ(pool.TryPin(pages[0]), nullptr);
  // Only the pinned page is left among the old ones: refused, not evicted.
  EXPECT_EQ(pool.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(static_cast<char*>(pool.data(pages[1]))[0], 1);  // untouched while pinned
  pool.Unpin(pages[1]);
  EXPECT_TRUE(pool.Allocate().ok());
  EXPECT_EQ(pool.TryPin(pages[1]), nullptr);
  const BlockPool::Stats st = pool.stats();
  EXPECT_EQ(st.capacity_slots, 4u);
  EXPECT_EQ(st.used, 4u);
  EXPECT_EQ(st.evictions, 4u);
  EXPECT_EQ(st.hits, 2u);
  EXPECT_EQ(st.misses, 4u);
  EXPECT_DOUBLE_EQ(st.usage_ratio(), 1.0);
}

// Full slabs are aligned for huge pages (whether the kernel grants them is
// its business); the pool's pages come from such slabs.
TEST(BlockPoolTest, PagesComeFromHugePageAlignedSlabs) {
  const PageSlab slab = AllocatePageSlab(kPageSlabBytes + 1);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(slab.get()) % kPageSlabBytes, 0u);
  std::memset(slab.get(), 1, kPageSlabBytes + 1);  // at least what was asked for
  BlockPool pool(2 * kPageSlabBytes, kPage);
  auto first = pool.Allocate();
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.data(*first)) % kPageSlabBytes, 0u);
  const PageSlab small = AllocatePageSlab(100);  // plain heap memory
  ASSERT_NE(small.get(), nullptr);
  std::memset(small.get(), 1, 100);
}

TEST(BlockPoolTest, FreeReturnsTheSlotAndStalesTheHandle) {
  BlockPool pool(2 * kPage, kPage);
  auto a = pool.Allocate();
  auto b = pool.Allocate();
  ASSERT_TRUE(a.ok() && b.ok());
  pool.MarkEvictable(*a);
  pool.Free(*a);
  EXPECT_EQ(pool.stats().used, 1u);
  EXPECT_EQ(pool.stats().evictable, 0u);
  auto c = pool.Allocate();
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->slot, a->slot);
  EXPECT_NE(c->generation, a->generation);
  EXPECT_EQ(pool.TryPin(*a), nullptr);
  EXPECT_EQ(pool.stats().evictions, 0u);
  pool.Free(*a);  // stale: must not free c
  EXPECT_EQ(pool.stats().used, 2u);
}

TEST(BlockPoolTest, ColdPagesGoFirstAndManyUnpinTogether) {
  BlockPool pool(3 * kPage, kPage);
  std::vector<BlockPool::Handle> pages;
  for (int i = 0; i < 3; ++i) pages.push_back(*pool.Allocate());
  pool.MarkEvictable(pages[0]);
  pool.MarkEvictable(pages[1], /*cold=*/true);  // fetched ahead, never read
  pool.MarkEvictable(pages[2]);
  for (auto h : pages) ASSERT_NE(pool.TryPin(h), nullptr);
  EXPECT_EQ(pool.stats().pinned, 3u);
  EXPECT_FALSE(pool.Allocate().ok());  // all pinned
  pool.Unpin(absl::MakeConstSpan(pages).subspan(1));  // 1 then 2: 2 is the newest
  pool.Unpin(pages[0]);                               // 0 newer still
  EXPECT_EQ(pool.stats().pinned, 0u);
  EXPECT_EQ(pool.stats().evictable, 3u);
  EXPECT_EQ(pool.Allocate()->slot, pages[1].slot);  // least recently unpinned
  EXPECT_EQ(pool.Allocate()->slot, pages[2].slot);
  EXPECT_EQ(pool.Allocate()->slot, pages[0].slot);
  EXPECT_EQ(pool.stats().evictable, 0u);
  // Cold means oldest: evicted before pages that were there first.
  BlockPool fresh(2 * kPage, kPage);
  auto warm = *fresh.Allocate();
  auto cold = *fresh.Allocate();
  fresh.MarkEvictable(warm);
  fresh.MarkEvictable(cold, /*cold=*/true);
  EXPECT_EQ(fresh.Allocate()->slot, cold.slot);
  EXPECT_EQ(fresh.Allocate()->slot, warm.slot);
}

TEST(BlockPoolTest, ManyThreadsNeverExceedTheBudgetOrShareASlot) {
  constexpr int kSlots = 64;
  BlockPool pool(kSlots * kPage, kPage);
  std::vector<std::atomic<int>> owners(kSlots);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<BlockPool::Handle> mine;
      for (int i = 0; i < 2000; ++i) {
        auto h = pool.Allocate();
        if (!h.ok()) continue;  // full of private pages for a moment
        if (owners[h->slot].fetch_add(1) != 0) ++errors;  // someone else holds it
        static_cast<char*>(pool.data(*h))[0] = static_cast<char>(t);
        owners[h->slot].fetch_sub(1);
        if (i % 2) {
          pool.MarkEvictable(*h);  // left for eviction; read back later
          mine.push_back(*h);
        } else {
          pool.Free(*h);
        }
        if (i % 7 == 0 && !mine.empty()) {
          if (void* p = pool.TryPin(mine[i % mine.size()])) {
            if (static_cast<char*>(p)[0] != static_cast<char>(t)) ++errors;
            pool.Unpin(mine[i % mine.size()]);
          }
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
