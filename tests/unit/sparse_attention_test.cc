// Sparse attention policies against dense attention on synthetic KV caches.
#include "compute_worker/attention/sparse_attention.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <random>

#include "absl/strings/str_cat.h"
#include "compute_worker/model/ggml_types.h"
#include "compute_worker/kv/cache_page_fetcher.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/kv/kv_page_reader.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

constexpr int kHeadDim = 64;

// A one-layer cache with random keys/values; `hot` blocks get keys aligned
// with `dir` (so a query along dir concentrates its attention there) and
// all-ones values (so the right answer is easy to tell from noise).
KvCache RandomCache(int n_head_kv, int length, int block, uint32_t seed,
                    const std::vector<int>& hot = {}, const std::vector<float>& dir = {}) {
  KvCache kv(1, n_head_kv, kHeadDim, block);
  kv.Reserve(length);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int h = 0; h < n_head_kv; ++h) {
    for (int t = 0; t < length; ++t) {
      const bool is_hot = std::find(hot.begin(), hot.end(), t / block) != hot.end();
      for (int i = 0; i < kHeadDim; ++i) {
        const float k = n(rng) + (is_hot ? 6.0f * dir[i] : 0.0f);
        const float v = is_hot ? 1.0f + 0.1f * n(rng) : n(rng);
        kv.KeySlot(0, h, t)[i] = Fp32ToFp16(k);
        kv.ValueSlot(0, h, t)[i] = Fp32ToFp16(v);
      }
    }
  }
  kv.Commit(length);
  return kv;
}

struct Output {
  std::vector<float> out;
  std::vector<HeadStepStats> stats;
};

Output Attend(const AttentionBackend& backend, const AttentionShape& shape, KvCache& kv,
              const std::vector<float>& q, int kv_head) {
  Output o;
  o.out.assign(shape.group() * shape.head_dim, 0.0f);
  o.stats.resize(shape.group());
  AttentionTask t;
  t.kv = &kv;
  t.kv_head = kv_head;
  t.q_pos0 = kv.length() - 1;
  t.n_q = 1;
  t.q = q.data();
  t.q_stride = static_cast<int>(q.size());
  t.out = o.out.data();
  t.out_stride = static_cast<int>(o.out.size());
  t.stats = o.stats.data();
  backend.Run(shape, t);
  return o;
}

double RelErr(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

std::vector<float> RandomQuery(int heads, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, scale);
  std::vector<float> q(heads * kHeadDim);
  for (float& x : q) x = n(rng);
  return q;
}

// Plain PSA: no budget floor, the default tail estimate.
AttentionPolicy Psa(float eps, bool certified = false) {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kPsa;
  p.epsilon = eps;
  p.certified = certified;
  p.min_blocks = 0;
  return p;
}

AttentionPolicy TopK(int k) {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kTopK;
  p.top_k = k;
  return p;
}

// Each block's exact attention mass sum_t exp(scale * q.k_t) for a
// one-head query, the test's own computation.
std::vector<double> BlockMasses(const KvCache& kv, const std::vector<float>& q, float scale) {
  const int block = kv.block_size();
  std::vector<double> mass((kv.length() + block - 1) / block, 0.0);
  for (int t = 0; t < kv.length(); ++t) {
    double dot = 0;
    for (int i = 0; i < kHeadDim; ++i) dot += q[i] * Fp16ToFp32(kv.Keys(0, 0).row(t)[i]);
    mass[t / block] += std::exp(scale * dot);
  }
  return mass;
}

// The candidate blocks (all but the first and the last of a cache of full
// blocks) in the order of their bounds for a one-head query.
std::vector<int> CandidatesByBound(const KvCache& kv, const std::vector<float>& q, float scale) {
  const int blocks = kv.full_blocks();
  std::vector<float> ub(blocks - 2), gscore(blocks - 2);
  const float* qs[] = {q.data()};
  kv.KeyBounds(0, 0).Score(qs, 1, scale, 1, blocks - 1, ub.data(), blocks - 2, gscore.data());
  std::vector<int> order(blocks - 2);
  for (int c = 0; c < blocks - 2; ++c) order[c] = c + 1;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return gscore[a - 1] > gscore[b - 1]; });
  return order;
}

// Dense rounds probabilities to fp16 (llama.cpp parity); the sparse engine
// keeps them in fp32, so "equal" means within that rounding.
constexpr double kSameAsDense = 2e-3;

TEST(SparseAttentionTest, FullBudgetEqualsDenseForManyShapes) {
  DenseAttention dense;
  SparseAttention psa1(Psa(1.0f)), psa1c(Psa(1.0f, true)), topk_all(TopK(1 << 20));
  for (int group : {1, 3}) {
    const AttentionShape shape{2 * group, 2, kHeadDim, 0.125f};
    for (int length : {1, 5, 16, 17, 64, 100, 257}) {
      for (int block : {16, 32}) {
        KvCache kv = RandomCache(2, length, block, length * 31 + block);
        const auto q = RandomQuery(group, length);
        for (int kv_head : {0, 1}) {
          const Output ref = Attend(dense, shape, kv, q, kv_head);
          for (const SparseAttention* b : {&psa1, &psa1c, &topk_all}) {
            const Output o = Attend(*b, shape, kv, q, kv_head);
            EXPECT_LT(RelErr(o.out, ref.out), kSameAsDense)
                << b->policy().ToString() << " group " << group << " length " << length
                << " block " << block;
            const int blocks = (length + block - 1) / block;
            for (const HeadStepStats& s : o.stats) {
              EXPECT_EQ(s.blocks_total, blocks);
              EXPECT_EQ(s.blocks_touched, blocks);
            }
          }
        }
      }
    }
  }
}

TEST(SparseAttentionTest, PsaStopsEarlyOnPeakedAttentionAndKeepsItsPromise) {
  const int length = 1024, block = 16;
  std::vector<float> dir(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) dir[i] = (i % 2 ? 1.0f : -1.0f) / std::sqrt(8.0f);
  KvCache kv = RandomCache(1, length, block, 5, {9, 23, 40}, dir);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  std::vector<float> q(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) q[i] = 8.0f * dir[i];
  DenseAttention dense;
  const Output ref = Attend(dense, shape, kv, q, 0);
  for (bool certified : {false, true}) {
    for (float eps : {0.8f, 0.95f, 0.99f}) {
      SparseAttention psa(Psa(eps, certified));
      const Output o = Attend(psa, shape, kv, q, 0);
      const HeadStepStats& s = o.stats[0];
      // Min/max bounds over 64 dimensions of random keys are loose, so the
      // certified stop may need every block; the plain estimate stops early.
      if (!certified) {
        EXPECT_LT(s.blocks_touched, s.blocks_total / 4) << "eps " << eps;
        EXPECT_GT(s.iterations, 1);
      }
      EXPECT_GE(s.captured, eps) << "eps " << eps << " certified " << certified;
      // Missing mass 1-c bounds the error: |o - o*| <= 2 (1-c) max|v|, and
      // here max|v| / |o*| is about 1.25.
      EXPECT_LT(RelErr(o.out, ref.out), 2.5 * (1 - eps) + 1e-3) << "eps " << eps;
    }
  }
  // A floor on the budget holds every head to at least min_blocks.
  AttentionPolicy floor = Psa(0.8f);
  floor.min_blocks = 20;
  const Output f = Attend(SparseAttention(floor), shape, kv, q, 0);
  EXPECT_GE(f.stats[0].blocks_touched, 20);
  EXPECT_LT(f.stats[0].blocks_touched, 20 + 4 + 1);  // stops within one group of it

  // The other tail estimates stop early here too.
  for (auto tail : {AttentionPolicy::TailEstimate::kMinSeen,
                    AttentionPolicy::TailEstimate::kLastGroupMean,
                    AttentionPolicy::TailEstimate::kCalibratedBound}) {
    AttentionPolicy p = Psa(0.95f);
    p.tail = tail;
    const Output o = Attend(SparseAttention(p), shape, kv, q, 0);
    EXPECT_LT(o.stats[0].blocks_touched, o.stats[0].blocks_total / 4) << p.ToString();
    EXPECT_GE(o.stats[0].captured, 0.95f) << p.ToString();
    EXPECT_LT(RelErr(o.out, ref.out), 2.5 * 0.05 + 1e-3) << p.ToString();
  }
}

TEST(SparseAttentionTest, AStoppedHeadAttendsWhatItsGroupReadsOnFor) {
  // A GQA group of two: head 0 aligned with a few hot blocks (stops soon),
  // head 1 a spread query (reads on for long).
  const int length = 2048, block = 16;
  std::vector<float> dir(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) dir[i] = (i % 2 ? 1.0f : -1.0f) / std::sqrt(8.0f);
  KvCache kv = RandomCache(1, length, block, 8, {9, 23, 40, 77}, dir);
  const AttentionShape shape{2, 1, kHeadDim, 0.125f};
  std::vector<float> q = RandomQuery(2, 3, 1.5f);
  for (int i = 0; i < kHeadDim; ++i) q[i] = 3.0f * dir[i];
  const Output ref = Attend(DenseAttention(), shape, kv, q, 0);
  AttentionPolicy p = Psa(0.9f);
  const Output shared = Attend(SparseAttention(p), shape, kv, q, 0);
  p.share_reads = false;
  const Output solo = Attend(SparseAttention(p), shape, kv, q, 0);
  // Same reads either way: the group reads the longer budget.
  EXPECT_EQ(shared.stats[1].blocks_touched, solo.stats[1].blocks_touched);
  EXPECT_LT(solo.stats[0].blocks_touched, solo.stats[1].blocks_touched);
  // Shared: head 0 attends all of them, and is closer to dense for it.
  EXPECT_EQ(shared.stats[0].blocks_touched, shared.stats[1].blocks_touched);
  auto head = [](const std::vector<float>& o, int g) {
    return std::vector<float>(o.begin() + g * kHeadDim, o.begin() + (g + 1) * kHeadDim);
  };
  EXPECT_LT(RelErr(head(shared.out, 0), head(ref.out, 0)), RelErr(head(solo.out, 0), head(ref.out, 0)));
  // Head 1 is the same computation either way.
  EXPECT_EQ(head(shared.out, 1), head(solo.out, 1));
}

TEST(SparseAttentionTest, TheCentreEstimateTracksTheTrueCapturedMass) {
  // One query head, one block per iteration, no floor: the blocks touched
  // are the forced ones (first and last) plus a prefix of the bound order,
  // so the test can tell the true captured fraction at the stop.
  const int length = 2048, block = 16, blocks = length / block;
  KvCache kv = RandomCache(1, length, block, 17);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  const std::vector<float> q = RandomQuery(1, 6, 2.0f);
  const std::vector<double> mass = BlockMasses(kv, q, 0.125f);
  double total = 0;
  for (double m : mass) total += m;
  const std::vector<int> by_bound = CandidatesByBound(kv, q, 0.125f);
  auto true_captured = [&](int touched) {
    double m = mass[0] + mass[blocks - 1];
    for (int k = 0; k < touched - 2; ++k) m += mass[by_bound[k]];
    return m / total;
  };
  double worst_centre = 0, worst_mean = 0;
  for (float eps : {0.5f, 0.7f, 0.9f}) {
    AttentionPolicy p = Psa(eps);
    p.group_blocks = 1;
    const Output o = Attend(SparseAttention(p), shape, kv, q, 0);
    ASSERT_LT(o.stats[0].blocks_touched, blocks) << "eps " << eps;  // it did stop
    const double c = true_captured(o.stats[0].blocks_touched);
    EXPECT_NEAR(c, eps, 0.1) << "eps " << eps;  // it stopped about where it should
    worst_centre = std::max(worst_centre, std::fabs(c - eps));
    p.tail = AttentionPolicy::TailEstimate::kLastGroupMean;
    const Output m = Attend(SparseAttention(p), shape, kv, q, 0);
    worst_mean = std::max(worst_mean, std::fabs(true_captured(m.stats[0].blocks_touched) - eps));
  }
  // Closer than the last-iteration mean, which stops far short here (it
  // takes the latest blocks' mass for every unseen block's: 0.28 at 0.5).
  EXPECT_LT(worst_centre, worst_mean);
}

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

// Attention for `rows` prompt rows ending at position `end` - 1 (default:
// the cache's last), as one task of a prefill pass in which the sequence
// has `entry_rows` rows.
std::vector<float> AttendRows(const AttentionBackend& backend, const AttentionShape& shape,
                              KvCache& kv, const float* q, int rows, int entry_rows,
                              HeadStepStats* last_stats = nullptr, int end = -1) {
  const int width = shape.group() * shape.head_dim;
  std::vector<float> out(static_cast<size_t>(rows) * width, 0.0f);
  AttentionTask t;
  t.kv = &kv;
  t.q_pos0 = (end < 0 ? kv.length() : end) - rows;
  t.n_q = rows;
  t.entry_rows = entry_rows;
  t.q = q;
  t.q_stride = width;
  t.out = out.data();
  t.out_stride = width;
  t.stats = last_stats;
  backend.Run(shape, t);
  return out;
}

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

TEST(SparseAttentionTest, TopKTouchesExactlyKBlocksAndFindsTheHotOnes) {
  const int length = 640, block = 16;
  std::vector<float> dir(kHeadDim, 1.0f / 8.0f);
  KvCache kv = RandomCache(1, length, block, 8, {11, 25}, dir);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  std::vector<float> q(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) q[i] = 8.0f * dir[i];
  const Output ref = Attend(DenseAttention(), shape, kv, q, 0);
  // sink + newest + 2 hot blocks
  const Output o = Attend(SparseAttention(TopK(4)), shape, kv, q, 0);
  EXPECT_EQ(o.stats[0].blocks_touched, 4);
  EXPECT_EQ(o.stats[0].blocks_total, 40);
  EXPECT_LT(RelErr(o.out, ref.out), 0.1);
  // A budget below the forced blocks still attends sink and tail only.
  const Output tiny = Attend(SparseAttention(TopK(1)), shape, kv, q, 0);
  EXPECT_EQ(tiny.stats[0].blocks_touched, 2);
}

TEST(SparseAttentionTest, OracleTakesTheHeaviestBlocksAndStopsOnTheExactMass) {
  const int length = 1024, block = 16, blocks = length / block;
  KvCache kv = RandomCache(1, length, block, 21);
  const AttentionShape shape{1, 1, kHeadDim, 0.125f};
  const std::vector<float> q = RandomQuery(1, 4, 2.0f);  // attention spread over many blocks
  const std::vector<double> mass = BlockMasses(kv, q, 0.125f);
  double total = 0;
  for (double m : mass) total += m;
  // Forced: the sink (block 0) and the newest full block (the last).
  double forced = mass[0] + mass[blocks - 1];
  std::vector<double> rest(mass.begin() + 1, mass.end() - 1);
  std::sort(rest.rbegin(), rest.rend());
  const std::vector<int> by_bound = CandidatesByBound(kv, q, 0.125f);
  for (float eps : {0.5f, 0.8f, 0.95f}) {
    AttentionPolicy p = Psa(eps);
    p.oracle_rank = p.oracle_stop = true;
    p.group_blocks = 1;
    const Output o = Attend(SparseAttention(p), shape, kv, q, 0);
    int need = 2;
    for (double acc = forced; acc < eps * total; acc += rest[need++ - 2]) {}
    EXPECT_NEAR(o.stats[0].blocks_touched, need, 1) << "eps " << eps;
    EXPECT_GE(o.stats[0].captured, eps - 1e-4) << "eps " << eps;
    EXPECT_LT(o.stats[0].blocks_touched, blocks) << "eps " << eps;
    // The exact stop alone: blocks in the bound's order, as many as it
    // takes to hold eps of the exact mass.
    p.oracle_rank = false;
    const Output s = Attend(SparseAttention(p), shape, kv, q, 0);
    int need_bound = 2;
    for (double acc = forced; acc < eps * total; acc += mass[by_bound[need_bound++ - 2]]) {}
    EXPECT_NEAR(s.stats[0].blocks_touched, need_bound, 1) << "eps " << eps;
    EXPECT_GE(s.stats[0].blocks_touched, need - 1) << "eps " << eps;  // heaviest-first needs fewest
    EXPECT_EQ(p.ToString(), absl::StrCat("psa(eps=", eps, ",G=1,oracle-stop)"));
  }
  // Top-k by exact mass errs less than top-k by the bound, at equal k.
  const Output ref = Attend(DenseAttention(), shape, kv, q, 0);
  AttentionPolicy ok = TopK(16);
  ok.oracle_rank = true;
  EXPECT_LT(RelErr(Attend(SparseAttention(ok), shape, kv, q, 0).out, ref.out),
            RelErr(Attend(SparseAttention(TopK(16)), shape, kv, q, 0).out, ref.out));
  EXPECT_EQ(ok.ToString(), "topk(k=16,oracle)");
}

TEST(SparseAttentionTest, PoliciesValidateTheirParameters) {
  EXPECT_TRUE(Psa(0.95f).Validate().ok());
  EXPECT_FALSE(Psa(0.0f).Validate().ok());
  EXPECT_FALSE(Psa(1.5f).Validate().ok());
  EXPECT_FALSE(TopK(0).Validate().ok());
  AttentionPolicy g = Psa(0.9f);
  g.group_blocks = 0;
  EXPECT_FALSE(g.Validate().ok());
  EXPECT_EQ(Psa(0.9f).ToString(), "psa(eps=0.9,G=4)");
  EXPECT_EQ(AttentionPolicy{}.ToString(), "psa(eps=0.9,G=4,min_blocks=24)");
  AttentionPolicy m = Psa(0.9f);
  m.tail = AttentionPolicy::TailEstimate::kMinSeen;
  EXPECT_EQ(m.ToString(), "psa(eps=0.9,G=4,min)");
  m.tail = AttentionPolicy::TailEstimate::kLastGroupMean;
  m.share_reads = false;
  EXPECT_EQ(m.ToString(), "psa(eps=0.9,G=4,mean,solo)");
  EXPECT_EQ(TopK(8).ToString(), "topk(k=8)");
  AttentionPolicy prefill = TopK(8);
  prefill.sparse_prefill_rows = 64;
  EXPECT_EQ(prefill.ToString(), "topk(k=8,prefill=64)");
  prefill.sparse_prefill_rows = -1;
  EXPECT_EQ(prefill.Validate().message(), "sparse_prefill_rows must be >= 0, got -1");
}

TEST(SparseAttentionTest, GenerationWithFullBudgetMatchesDenseAndPoliciesMixInABatch) {
  auto bytes = testing::BuildTinyLlamaGguf(testing::TinyModelSpec{});
  auto model = LlamaModel::Load(testing::WriteTempFile(bytes, "sparse_tiny.gguf"));
  ASSERT_TRUE(model.ok());
  LlamaRuntime dense_rt(**model, RuntimeOptions{});
  LlamaRuntime psa_rt(**model, RuntimeOptions{}, MakeAttention(Psa(1.0f)));
  GenerationRequest req;
  req.prompt.assign(70, 0);
  for (int i = 0; i < 70; ++i) req.prompt[i] = (i * 37 + 11) % (*model)->hparams().n_vocab;
  req.max_tokens = 24;
  req.ignore_eos = true;
  auto a = Generate(dense_rt, req);
  auto b = Generate(psa_rt, req);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_GT(a->kv_blocks_total, 0);
  EXPECT_EQ(a->kv_blocks_touched, a->kv_blocks_total);  // dense reads everything

  // A per-request policy in the generation loop, with its KV accounting.
  SparseAttention top2(TopK(2));
  req.attention = &top2;
  auto c = Generate(dense_rt, req);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->tokens.size(), a->tokens.size());
  EXPECT_LT(c->kv_blocks_touched, c->kv_blocks_total);
  req.attention = nullptr;

  // One batch, two policies: each entry gets its own backend and stats.
  SparseAttention topk(TopK(2));
  KvCache k1 = dense_rt.NewCache(), k2 = dense_rt.NewCache();
  std::vector<float> logits;
  ASSERT_TRUE(dense_rt.Prefill(&k1, req.prompt, &logits).ok());
  ASSERT_TRUE(dense_rt.Prefill(&k2, req.prompt, &logits).ok());
  const TokenId t = 3;
  std::vector<HeadStepStats> s1, s2;
  std::vector<BatchEntry> batch = {{&k1, {&t, 1}, true, nullptr, &s1},
                                   {&k2, {&t, 1}, true, &topk, &s2}};
  ASSERT_TRUE(dense_rt.Forward(batch, &logits).ok());
  const auto& hp = (*model)->hparams();
  ASSERT_EQ(s1.size(), static_cast<size_t>(hp.n_layer * hp.n_head));
  ASSERT_EQ(s2.size(), s1.size());
  for (size_t i = 0; i < s1.size(); ++i) {
    EXPECT_EQ(s1[i].blocks_touched, s1[i].blocks_total);  // dense: everything
    // 71 tokens: 5 blocks; the sink, the newest full one and the partial
    // tail are always attended, so a budget of 2 still touches 3.
    EXPECT_EQ(s2[i].blocks_touched, 3);
    EXPECT_EQ(s2[i].blocks_total, 5);
  }
}

}  // namespace
}  // namespace psa
