// The shared CPU / GPU math (compute_worker/attention/psa_math.h) on the
// CPU: bounds against exact dot products, the online-softmax merge against
// a one-shot softmax, the stop rule's estimates against StopRule and hand
// computations, the layout against LayoutOf.
#include "compute_worker/attention/psa_math.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "common/attention_policy.h"
#include "compute_worker/attention/block_layout.h"
#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/attention/head_state.h"
#include "compute_worker/attention/stop_rule.h"
#include "compute_worker/kv/block_bounds.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/model/ggml_types.h"

namespace psa {
namespace {

float RoundFp16(float x) { return Fp16ToFp32(Fp32ToFp16(x)); }

TEST(PsaMathTest, BoxBoundIsNeverBelowAKeyInTheBoxAndReachesItsCorner) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int d : {64, 128}) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> q(d), hi(d), lo(d), k(d), corner(d);
      for (int i = 0; i < d; ++i) {
        q[i] = 2.0f * n(rng);
        const float a = RoundFp16(n(rng)), b = RoundFp16(n(rng));
        hi[i] = std::max(a, b);
        lo[i] = std::min(a, b);
        corner[i] = q[i] >= 0 ? hi[i] : lo[i];
      }
      const float ub = PsaBoxBound(q.data(), hi.data(), lo.data(), d, scale);
      for (int key = 0; key < 16; ++key) {
        double dot = 0, mag = 0;
        for (int i = 0; i < d; ++i) {
          // Any fp16 value in [lo, hi] (rounding stays inside: the ends are fp16).
          const float u = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
          k[i] = std::clamp(RoundFp16(lo[i] + u * (hi[i] - lo[i])), lo[i], hi[i]);
          dot += static_cast<double>(q[i]) * k[i];
          mag += std::fabs(static_cast<double>(q[i]) * k[i]);
        }
        EXPECT_GE(ub, scale * dot - 1e-6 * scale * mag) << "d=" << d << " trial " << trial;
      }
      double top = 0, mag = 0;
      for (int i = 0; i < d; ++i) {
        top += static_cast<double>(q[i]) * corner[i];
        mag += std::fabs(static_cast<double>(q[i]) * corner[i]);
      }
      EXPECT_NEAR(ub, scale * top, 1e-6 * scale * mag);  // tight: the corner is in the box
      double centre = 0;
      for (int i = 0; i < d; ++i) centre += q[i] * 0.5 * (static_cast<double>(hi[i]) + lo[i]);
      EXPECT_NEAR(PsaCentreScore(q.data(), hi.data(), lo.data(), d, scale), scale * centre,
                  1e-5 * scale * mag);
    }
  }
}

// The CPU engine's 8-bit bounds (BlockBounds) are never below the exact
// box bound, so a GPU that ranks by PsaBoxBound ranks on a tighter bound.
TEST(PsaMathTest, TheCpusEightBitBoundIsNeverBelowTheExactBoxBound) {
  constexpr int kD = 64, kBlocks = 40, kGroup = 3;
  std::mt19937 rng(11);
  std::normal_distribution<float> n(0.0f, 1.0f);
  BlockBounds bounds(kD);
  bounds.Reserve(kBlocks);
  std::vector<float> hi(kBlocks * kD), lo(kBlocks * kD);
  for (int b = 0; b < kBlocks; ++b) {
    std::vector<uint16_t> mx(kD), mn(kD), me(kD);
    for (int i = 0; i < kD; ++i) {
      const float a = RoundFp16(n(rng) + 0.3f * b / kBlocks), c = RoundFp16(n(rng));
      hi[b * kD + i] = std::max(a, c);
      lo[b * kD + i] = std::min(a, c);
      mx[i] = Fp32ToFp16(hi[b * kD + i]);
      mn[i] = Fp32ToFp16(lo[b * kD + i]);
      me[i] = Fp32ToFp16(0.5f * (a + c));
    }
    bounds.Set(b, mx.data(), mn.data(), me.data());
  }
  std::vector<float> q(kGroup * kD);
  for (float& x : q) x = n(rng);
  const float* qs[kGroup] = {q.data(), q.data() + kD, q.data() + 2 * kD};
  const float scale = 0.125f;
  std::vector<float> ub(kGroup * kBlocks), gscore(kBlocks), centre(kGroup * kBlocks);
  bounds.Score(qs, kGroup, scale, 0, kBlocks, ub.data(), kBlocks, gscore.data(), centre.data());
  for (int b = 0; b < kBlocks; ++b) {
    float best = -INFINITY;
    for (int g = 0; g < kGroup; ++g) {
      const float exact = PsaBoxBound(qs[g], &hi[b * kD], &lo[b * kD], kD, scale);
      EXPECT_GE(ub[g * kBlocks + b], exact - 1e-4f * std::fabs(exact)) << "block " << b;
      best = std::max(best, ub[g * kBlocks + b]);
      // The 8-bit centre is the exact one up to its steps.
      EXPECT_NEAR(centre[g * kBlocks + b],
                  PsaCentreScore(qs[g], &hi[b * kD], &lo[b * kD], kD, scale), 0.05f);
    }
    EXPECT_EQ(gscore[b], best);
  }
}

// Blocks merged one at a time (PsaRescale) and parts merged pairwise
// (PsaMergeStates) give the one-shot softmax.
TEST(PsaMathTest, OnlineMergeEqualsOneShotSoftmax) {
  constexpr int kN = 300, kD = 8;
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> s(kN), v(kN * kD);
  for (int t = 0; t < kN; ++t) s[t] = 4.0f * n(rng) + 0.02f * t;  // max rises along the way
  for (float& x : v) x = n(rng);
  std::vector<double> ref(kD, 0.0);
  double mx = -INFINITY, total = 0;
  for (float x : s) mx = std::max(mx, static_cast<double>(x));
  for (int t = 0; t < kN; ++t) {
    const double p = std::exp(s[t] - mx);
    total += p;
    for (int i = 0; i < kD; ++i) ref[i] += p * v[t * kD + i];
  }
  for (double& x : ref) x /= total;

  struct Part {
    float m = -INFINITY;
    double l = 0;
    std::vector<float> acc = std::vector<float>(kD, 0.0f);
  };
  // Keys [t0, t1) in blocks of 16, as the engines do.
  auto run = [&](int t0, int t1) {
    Part p;
    for (int b = t0; b < t1; b += 16) {
      const int e = std::min(t1, b + 16);
      float bm = -INFINITY;
      for (int t = b; t < e; ++t) bm = std::max(bm, s[t]);
      if (bm > p.m) {
        const float r = PsaRescale(p.m, bm);
        p.l *= r;
        for (float& a : p.acc) a *= r;
        p.m = bm;
      }
      for (int t = b; t < e; ++t) {
        const float w = std::exp(s[t] - p.m);
        p.l += w;
        for (int i = 0; i < kD; ++i) p.acc[i] += w * v[t * kD + i];
      }
    }
    return p;
  };
  auto merge = [](const Part& a, const Part& b) {
    Part out;
    float ra, rb;
    PsaMergeStates(a.m, a.l, b.m, b.l, &out.m, &out.l, &ra, &rb);
    for (int i = 0; i < kD; ++i) out.acc[i] = a.acc[i] * ra + b.acc[i] * rb;
    return out;
  };
  auto expect_ref = [&](const Part& p, const char* what) {
    for (int i = 0; i < kD; ++i) EXPECT_NEAR(p.acc[i] / p.l, ref[i], 1e-5) << what << " dim " << i;
  };
  expect_ref(run(0, kN), "one pass");
  expect_ref(merge(run(0, 100), run(100, kN)), "two splits");
  expect_ref(merge(run(200, kN), merge(run(0, 48), run(48, 200))), "three splits, out of order");
  expect_ref(merge(Part{}, run(0, kN)), "an empty split first");
  expect_ref(merge(run(0, kN), Part{}), "an empty split last");

  // Two empty parts stay empty (no NaN).
  float m, ra, rb;
  double l;
  PsaMergeStates(-INFINITY, 0, -INFINITY, 0, &m, &l, &ra, &rb);
  EXPECT_EQ(l, 0.0);
  EXPECT_FALSE(std::isnan(ra) || std::isnan(rb));
  EXPECT_EQ(PsaRescale(-INFINITY, 1.5f), 0.0f);
}

AttentionPolicy PsaPolicy(bool certified) {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kPsa;
  p.certified = certified;
  return p;
}

// StopRule's estimates, which now call psa_math.h, against the formulas
// computed here by hand; and the decision at its edges.
TEST(PsaMathTest, UnseenEstimatesMatchStopRuleAndHandComputation) {
  constexpr int kCand = 5, kB = 16;
  // Head 0's candidate scores; head 1's all equal.
  std::vector<float> x = {0.0f, std::log(2.0f), -1.0f, std::log(4.0f), 0.5f,
                          1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  const float x_max0 = std::log(4.0f);
  double w_total0 = 0;
  for (int c = 0; c < kCand; ++c) w_total0 += std::exp(static_cast<double>(x[c]) - x_max0);

  for (bool certified : {false, true}) {
    StopRule rule(PsaPolicy(certified), ResearchSelection::Tail::kServed, false);
    EXPECT_EQ(rule.estimate(), !certified);
    std::vector<float> w = x;
    rule.Weigh(w.data(), 2, kCand);
    HeadState h;
    h.m = 2.5f;
    h.l = 10.0;
    // Candidates 1 and 3 attended: weights 0.5 and 1.
    h.seen_w = rule.weight(0, 1) + rule.weight(0, 3);
    h.seen_sum = 6.0;
    const double w_unseen = w_total0 - 1.5;
    const double expected = certified ? kB * w_unseen * std::exp(x_max0 - 2.5)
                                      : w_unseen * (6.0 / 1.5);
    const double got = rule.Unseen(h, 0, 3, kB);
    EXPECT_NEAR(got, expected, 1e-6 * expected) << "certified=" << certified;
    // The shared functions give StopRule's value from its own weights.
    double w_total = 0;
    for (int c = 0; c < kCand; ++c) w_total += rule.weight(0, c);
    const double u = PsaUnseenWeight(w_total, h.seen_w);
    const double shared = certified ? PsaUnseenCertified(u, kB, x_max0, h.m)
                                    : PsaUnseenEstimate(u, h.seen_w, h.seen_sum);
    EXPECT_NEAR(shared, got, 1e-9 * got);
    // Head 1: every weight is 1.
    HeadState h1;
    h1.m = 1.0f;
    h1.l = 3.0;
    h1.seen_w = 2.0;
    h1.seen_sum = 2.0;
    EXPECT_NEAR(rule.Unseen(h1, 1, 3, kB), certified ? kB * 3.0 : 3.0, 1e-6);
  }
  // Nothing attended yet: the centre estimate is unknown, P is 0.
  EXPECT_EQ(PsaUnseenEstimate(3.0, 0.0, 0.0), INFINITY);
  EXPECT_EQ(PsaCaptured(5.0, INFINITY), 0.0);
  // Attended more than the total (rounding): never a negative unseen mass.
  EXPECT_EQ(PsaUnseenWeight(1.0, 1.0 + 1e-12), 0.0);
  EXPECT_EQ(PsaCaptured(5.0, PsaUnseenEstimate(0.0, 1.0, 5.0)), 1.0);
  // The decision: P >= epsilon (a float), after min_blocks.
  EXPECT_TRUE(PsaStops(PsaCaptured(9.0, 1.0), 0.9f));
  EXPECT_FALSE(PsaStops(PsaCaptured(8.9, 1.1), 0.9f));
  EXPECT_TRUE(PsaMayStop(24, 24));
  EXPECT_FALSE(PsaMayStop(23, 24));
}

TEST(PsaMathTest, LayoutAndTakeMatchTheCpuEngine) {
  constexpr int kB = 16;
  for (int length : {1, 15, 16, 17, 33, 64, 100, 257}) {
    KvCache kv(1, 1, 64, kB);
    kv.Reserve(length);
    kv.Commit(length);
    for (int n_keys = 1; n_keys <= length; n_keys += 7) {
      for (int sink : {0, 1, 2}) {
        for (int local : {0, 1, 3}) {
          AttentionPolicy p;
          p.sink_blocks = sink;
          p.local_blocks = local;
          const BlockLayout cpu = LayoutOf(kv, n_keys, p);
          const PsaLayout gpu = PsaLayoutOf(n_keys, kv.full_blocks(), kB, sink, local);
          ASSERT_EQ(gpu.n_blocks, cpu.n_blocks);
          ASSERT_EQ(gpu.sink, cpu.sink);
          ASSERT_EQ(gpu.local_begin, cpu.local_begin);
          ASSERT_EQ(gpu.forced(), cpu.forced());
          for (int k : {0, 1, 3, 8, 1000}) {
            // SparseAttention::RunQuery's take for top-k.
            EXPECT_EQ(PsaTake(true, k, gpu), std::clamp(k - cpu.forced(), 0, cpu.n_cand()));
          }
          EXPECT_EQ(PsaTake(false, 1, gpu), cpu.n_cand());
        }
      }
    }
  }
}

// PsaOrderKey is BlockRanking's order as one integer: sorting the keys
// gives the CPU engine's order (what the device's RunBlockOrder relies on),
// ties, NaNs, signed zeros and infinities included.
TEST(PsaMathTest, OrderKeysSortIntoBlockRankingsOrder) {
  std::mt19937 rng(11);
  for (int n : {1, 2, 7, 64, 1000, 5000}) {
    std::vector<float> score(n);
    std::uniform_int_distribution<int> pick(0, 9);
    std::normal_distribution<float> value(0.0f, 3.0f);
    for (float& x : score) {
      switch (pick(rng)) {
        case 0: x = NAN; break;
        case 1: x = -0.0f; break;
        case 2: x = 0.0f; break;
        case 3: x = INFINITY; break;
        case 4: x = -INFINITY; break;
        case 5: x = 1.5f; break;  // ties
        default: x = value(rng); break;
      }
    }
    BlockRanking ranking;
    ranking.Reset(score.data(), n);
    ASSERT_GE(ranking.Extend(n), n);
    std::vector<unsigned long long> keys(n);
    for (int c = 0; c < n; ++c) keys[c] = PsaOrderKey(score[c], c);
    std::sort(keys.begin(), keys.end());
    for (int k = 0; k < n; ++k) {
      ASSERT_EQ(static_cast<int>(keys[k] & 0xffffffffu), ranking.order()[k])
          << "n " << n << ", rank " << k;
    }
  }
}

}  // namespace
}  // namespace psa
