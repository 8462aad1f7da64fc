// Prompt (prefill) rows through dense and sparse attention: each row equals
// its decode step, and a sparse prefill reads (and fetches) what its rows select.
#include <algorithm>
#include <cmath>
#include <vector>

#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/kv/cache_page_fetcher.h"
#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"
#include "tests/unit/sparse_attention_testing.h"

namespace psa {
namespace {

using testing::AttendRows;
using testing::kHeadDim;
using testing::Psa;
using testing::RandomCache;
using testing::RandomQuery;
using testing::RelErr;
using testing::TopK;

// Dense's value pass makes probabilities a chunk of keys at a time: across
// chunk boundaries (and a partial last block) the rows of a prompt still
// equal their decode steps bit for bit, and both stay close to attention
// computed in doubles.
TEST(SparseAttentionTest, DenseRowsOfAPromptEqualTheirDecodeStepsOverManyValueChunks) {
  const int length = 3000, rows = 5, group = 3;
  KvCache kv = RandomCache(1, length, 16, 43);
  const AttentionShape shape{group, 1, kHeadDim, 0.125f};
  const std::vector<float> qv = RandomQuery(rows * group, 6);
  const DenseAttention dense;
  const std::vector<float> out = AttendRows(dense, shape, kv, qv.data(), rows, rows);
  const int width = group * kHeadDim;
  for (int r = 0; r < rows; ++r) {
    const int end = length - rows + r + 1;
    const std::vector<float> one = AttendRows(dense, shape, kv, qv.data() + r * width, 1, 1, nullptr, end);
    EXPECT_EQ(std::vector<float>(out.begin() + r * width, out.begin() + (r + 1) * width), one)
        << "row " << r;
    for (int g = 0; g < group; ++g) {
      const float* q = qv.data() + r * width + g * kHeadDim;
      std::vector<double> s(end);
      double m = -INFINITY, sum = 0;
      for (int t = 0; t < end; ++t) {
        double dot = 0;
        for (int i = 0; i < kHeadDim; ++i) dot += q[i] * Fp16ToFp32(kv.KeySlot(0, 0, t)[i]);
        s[t] = dot * shape.scale;
        m = std::max(m, s[t]);
      }
      for (double& x : s) sum += (x = std::exp(x - m));
      std::vector<float> ref(kHeadDim), got(one.begin() + g * kHeadDim, one.begin() + (g + 1) * kHeadDim);
      for (int t = 0; t < end; ++t) {
        for (int i = 0; i < kHeadDim; ++i) ref[i] += s[t] / sum * Fp16ToFp32(kv.ValueSlot(0, 0, t)[i]);
      }
      EXPECT_LT(RelErr(got, ref), 5e-3) << "row " << r << " head " << g;
    }
  }
}

TEST(SparseAttentionTest, AShortPromptAfterALongContextSelectsRowByRowAsDecodeWould) {
  const int length = 4096, block = 16, rows = 8;
  // Every 16th block "hot"; the prompt's rows look for them.
  std::vector<int> hot;
  for (int b = 5; b < length / block; b += 16) hot.push_back(b);
  std::vector<float> dir(kHeadDim, 1.0f / 8.0f);
  KvCache store = RandomCache(1, length, block, 41, hot, dir);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  std::vector<float> qv = RandomQuery(rows, 5, 0.25f);  // one head, 8 rows
  for (size_t i = 0; i < qv.size(); ++i) qv[i] += 8.0f * dir[i % kHeadDim];
  const float* q = qv.data();
  AttentionPolicy p = Psa(0.9f);
  p.resident_bias = 0;
  p.sparse_prefill_rows = 64;
  const SparseAttention psa(p);
  HeadStepStats last;
  const std::vector<float> out = AttendRows(psa, shape, store, q, rows, rows, &last);
  EXPECT_LT(last.blocks_touched, last.blocks_total / 2);
  // Each row is the decode step at its position, bit for bit.
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> one =
        AttendRows(psa, shape, store, q + r * kHeadDim, 1, 1, nullptr, length - rows + r + 1);
    EXPECT_EQ(std::vector<float>(out.begin() + r * kHeadDim, out.begin() + (r + 1) * kHeadDim),
              one)
        << "row " << r;
  }
  // Past sparse_prefill_rows the prompt is attended densely: dense's output.
  const std::vector<float> dense = AttendRows(DenseAttention(), shape, store, q, rows, rows);
  EXPECT_NE(out, dense);
  EXPECT_EQ(AttendRows(psa, shape, store, q, rows, p.sparse_prefill_rows + 1), dense);
  AttentionPolicy off = p;
  off.sparse_prefill_rows = 0;
  EXPECT_EQ(AttendRows(SparseAttention(off), shape, store, q, rows, rows), dense);
  // A context the policy would read whole anyway is attended densely too.
  KvCache short_context = RandomCache(1, 20 * block, block, 42);
  AttentionPolicy top64 = TopK(64);
  top64.sparse_prefill_rows = 64;
  EXPECT_EQ(AttendRows(SparseAttention(top64), shape, short_context, q, rows, rows),
            AttendRows(DenseAttention(), shape, short_context, q, rows, rows));

  // Through a pool of a quarter of the pages: the prompt fetches what its
  // rows read, not the whole context.
  auto fetched = [&](const AttentionPolicy& policy) {
    CachePageFetcher fetcher(store);
    BlockPool pool(length / block / 4 * store.page_bytes(), store.page_bytes());
    KvPagingCounters counters;
    KvCache kv = PooledCopy(store, KvPaging{&pool, &fetcher, &counters});
    EXPECT_EQ(AttendRows(SparseAttention(policy), shape, kv, q, rows, rows),
              AttendRows(SparseAttention(policy), shape, store, q, rows, rows));
    return static_cast<int>(counters.page_fetches);
  };
  EXPECT_GE(fetched(off), length / block * 3 / 4);
  EXPECT_LT(fetched(p), length / block / 2);
}

}  // namespace
}  // namespace psa
