// Sparse attention through a block pool: pages fetched on demand from a
// store, what each policy asks for and when.
#include <memory>
#include <vector>

#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/kv/cache_page_fetcher.h"
#include "compute_worker/kv/kv_page_reader.h"
#include "gtest/gtest.h"
#include "tests/unit/sparse_attention_testing.h"

namespace psa {
namespace {

using testing::Attend;
using testing::kHeadDim;
using testing::Output;
using testing::Psa;
using testing::RandomCache;
using testing::RandomQuery;
using testing::RelErr;
using testing::TopK;

TEST(SparseAttentionTest, ThroughAPoolPsaFetchesWhereItsEstimateSaysItWillStop) {
  // A pool-backed copy of a cache whose pages all have to be fetched, and
  // a spread query that takes PSA many iterations.
  const int length = 4096, block = 16;
  KvCache store = RandomCache(1, length, block, 31);
  CachePageFetcher fetcher(store);
  BlockPool pool(4 * store.page_bytes(), store.page_bytes());
  KvPagingCounters counters;
  KvCache kv = PooledCopy(store, KvPaging{&pool, &fetcher, &counters});
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  const std::vector<float> q = RandomQuery(1, 9, 2.0f);
  AttentionPolicy p = Psa(0.9f);
  p.resident_bias = 0;  // the order of the private cache, whatever the pool holds
  const Output o = Attend(SparseAttention(p), shape, kv, q, 0);
  const Output same = Attend(SparseAttention(p), shape, store, q, 0);
  EXPECT_EQ(o.out, same.out);  // the pool changes where pages come from, nothing else
  EXPECT_EQ(o.stats[0].blocks_touched, same.stats[0].blocks_touched);
  ASSERT_GT(o.stats[0].iterations, 8);
  // One request for the forced blocks, one for the first iteration, then
  // the prediction: far fewer than one per iteration.
  EXPECT_LE(fetcher.requests(), o.stats[0].iterations / 2)
      << fetcher.requests() << " requests for " << o.stats[0].iterations << " iterations";
  // Fetching ahead overshoots little: at most one iteration past the stop,
  // and the pages fetched but not read are counted as such.
  EXPECT_LE(static_cast<int>(counters.page_fetches), o.stats[0].blocks_touched + 4);
  // Every block touched was fetched and read, or a pool hit (4 slots).
  const int read_fetched = static_cast<int>(counters.page_fetches - counters.unread_fetches);
  EXPECT_LE(read_fetched, o.stats[0].blocks_touched);
  EXPECT_GE(read_fetched, o.stats[0].blocks_touched - 4);
  EXPECT_LE(static_cast<int>(counters.unread_fetches), 4);
}

TEST(SparseAttentionTest, ThroughAPoolTheResidentBiasReadsResidentBlocksFirst) {
  // Every 8th block "hot" (three quarters of the attention mass), the
  // rest near-equal noise; half the blocks evicted from the pool.
  const int length = 4096, block = 16, blocks = length / block;
  std::vector<int> hot;
  for (int b = 3; b < blocks; b += 8) hot.push_back(b);
  std::vector<float> dir(kHeadDim, 1.0f / 8.0f);
  KvCache store = RandomCache(1, length, block, 31, hot, dir);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  std::vector<float> q(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) q[i] = 4.0f * dir[i];
  const Output ref = Attend(DenseAttention(), shape, store, q, 0);
  auto run = [&](float bias, int* fetches) {
    CachePageFetcher fetcher(store);
    BlockPool pool(blocks * 3 / 2 * store.page_bytes(), store.page_bytes());
    KvPagingCounters counters;
    KvCache kv = PooledCopy(store, KvPaging{&pool, &fetcher, &counters});
    // Fill the pool (evicting the least recently stored half of the
    // blocks), then free the slots that were free: room to fetch into.
    std::vector<BlockPool::Handle> taken;
    for (int i = 0; i < blocks; ++i) taken.push_back(*pool.Allocate());
    for (int i = 0; i < blocks / 2; ++i) pool.Free(taken[i]);
    AttentionPolicy p = Psa(0.9f);
    p.resident_bias = bias;
    const Output o = Attend(SparseAttention(p), shape, kv, q, 0);
    *fetches = static_cast<int>(counters.page_fetches);
    return o;
  };
  int plain_fetches = 0, biased_fetches = 0;
  const Output plain = run(0.0f, &plain_fetches);
  const Output biased = run(2.0f, &biased_fetches);
  // Measured: 46 fetches against 79 (162 and 170 blocks read).
  EXPECT_LT(biased_fetches, plain_fetches * 3 / 4) << biased_fetches << " vs " << plain_fetches;
  // The stop rule still holds the head to eps of the (estimated) mass: the
  // output is as close to dense as without the bias.
  EXPECT_GE(biased.stats[0].captured, 0.9f);
  EXPECT_LT(RelErr(biased.out, ref.out), 1.2 * RelErr(plain.out, ref.out));
}

TEST(SparseAttentionTest, ThroughAPoolStartFetchesAsksUpFrontForWhatRunWouldAndRunUsesIt) {
  const int length = 4096, block = 16;
  KvCache store = RandomCache(1, length, block, 51);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  const std::vector<float> q = RandomQuery(1, 3, 2.0f);
  for (const AttentionPolicy& p : {TopK(40), Psa(0.9f)}) {
    const SparseAttention backend(p);
    // fetches[0]: Run alone; fetches[1]: StartFetches, then Run with its reader.
    int requests_before_run = 0, requests[2] = {0, 0};
    uint64_t fetches[2] = {0, 0};
    std::vector<float> out[2];
    for (int with_start = 0; with_start < 2; ++with_start) {
      CachePageFetcher fetcher(store);
      BlockPool pool(length / block * store.page_bytes(), store.page_bytes());
      KvPagingCounters counters;
      KvCache kv = PooledCopy(store, KvPaging{&pool, &fetcher, &counters});
      // Evict every page: the first read of each is a fetch.
      for (int i = 0; i < length / block; ++i) ASSERT_TRUE(pool.Allocate().ok());
      AttentionTask t;
      t.kv = &kv;
      t.q_pos0 = length - 1;
      t.n_q = 1;
      t.q = q.data();
      t.q_stride = kHeadDim;
      out[with_start].assign(kHeadDim, 0.0f);
      t.out = out[with_start].data();
      t.out_stride = kHeadDim;
      std::unique_ptr<KvPageReader> reader;
      if (with_start) {
        reader = backend.StartFetches(shape, t);
        ASSERT_NE(reader, nullptr);
        requests_before_run = fetcher.requests();
        EXPECT_GT(requests_before_run, 0);
        t.reader = reader.get();
      }
      backend.Run(shape, t);
      reader.reset();
      requests[with_start] = fetcher.requests();
      fetches[with_start] = counters.page_fetches;
    }
    EXPECT_EQ(out[1], out[0]) << p.ToString();       // pages from the same place
    EXPECT_EQ(fetches[1], fetches[0]) << p.ToString();  // none asked for twice
    if (p.kind == AttentionPolicy::Kind::kTopK) {
      // Top-k's whole budget was asked for before Run computed anything.
      EXPECT_EQ(requests[1], requests_before_run);
      EXPECT_EQ(fetches[1], 40u);
    }
  }
}

}  // namespace
}  // namespace psa
