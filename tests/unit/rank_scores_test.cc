// The rank scores (compute_worker/attention/rank_scores.h): the estimate
// against the test's own double-precision computation, the bound against
// BlockBounds, and the case the estimate exists for.
#include "compute_worker/attention/rank_scores.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "compute_worker/attention/psa_math.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"
#include "tests/unit/sparse_attention_testing.h"

namespace psa {
namespace {

TEST(RankScoresTest, TheEstimateIsTheLogOfTheHeadsSummedShares) {
  constexpr int kGroup = 3, kN = 200;
  std::mt19937 rng(5);
  std::normal_distribution<float> x(0.0f, 3.0f);
  std::uniform_real_distribution<float> width(0.0f, 4.0f);
  std::vector<float> ub(kGroup * kN), centre(kGroup * kN), r(kN), got(kN);
  for (int i = 0; i < kGroup * kN; ++i) {
    centre[i] = x(rng) + (i / kN == 1 ? 20.0f : 0.0f);  // head 1 on another scale
    ub[i] = centre[i] + width(rng);
  }
  EstimateGroupScores(ub.data(), centre.data(), kGroup, kN, r.data(), got.data());
  std::vector<double> share(kN, 0.0);
  for (int g = 0; g < kGroup; ++g) {
    double total = 0;
    for (int c = 0; c < kN; ++c) {
      const double e = centre[g * kN + c] + kPsaRankWidth * (ub[g * kN + c] - centre[g * kN + c]);
      total += std::exp(e);
    }
    for (int c = 0; c < kN; ++c) {
      const double e = centre[g * kN + c] + kPsaRankWidth * (ub[g * kN + c] - centre[g * kN + c]);
      share[c] += std::exp(e) / total;
    }
  }
  for (int c = 0; c < kN; ++c) {
    const float want = PsaShareLog(static_cast<float>(share[c]));
    ASSERT_NEAR(got[c], want, 1e-4 * (1 + std::fabs(want))) << "candidate " << c;
  }
}

TEST(RankScoresTest, TheShareLogIsAMonotoneLogWithin006) {
  float prev = -INFINITY;
  for (double x = 1e-30; x < 1e3; x *= 1.0007) {
    const float got = PsaShareLog(static_cast<float>(x));
    ASSERT_NEAR(got, std::log(static_cast<float>(x)), 0.06) << x;
    ASSERT_GE(got, prev) << x;
    prev = got;
  }
  EXPECT_EQ(PsaShareLog(1.0f), 0.0f);
  EXPECT_EQ(PsaShareLog(0.0f), -INFINITY);
  EXPECT_EQ(PsaShareLog(NAN), -INFINITY);
}

// A block whose keys stick out both ways, each in its own dimensions, has a
// wide box and a high bound, though half its keys score low and the rest
// moderately: the bound ranks it over blocks whose every key leans toward
// the query; the estimate does not.
TEST(RankScoresTest, TheEstimateRanksTypicalKeysAboveAWideBox) {
  using testing::kHeadDim;
  constexpr int kBlock = 16, kBlocks = 64;
  const std::vector<int> hot = {10, 30, 50}, wide = {5, 20, 40, 60};
  KvCache kv(1, 1, kHeadDim, kBlock);
  kv.Reserve(kBlocks * kBlock);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 0.3f);
  std::vector<float> q(kHeadDim, 1.0f);
  for (int t = 0; t < kBlocks * kBlock; ++t) {
    const int b = t / kBlock;
    const bool is_hot = std::count(hot.begin(), hot.end(), b) > 0;
    const bool is_wide = std::count(wide.begin(), wide.end(), b) > 0;
    for (int i = 0; i < kHeadDim; ++i) {
      float k = n(rng) + (is_hot ? 0.4f : is_wide ? 0.0f : -0.3f);  // the rest lean away
      // Keys 2j and 2j + 1 of a wide block stick out -1 and +1 in dims
      // [8j, 8j + 8).
      if (is_wide && i / 8 == (t % kBlock) / 2) k += t % 2 ? 1.0f : -1.0f;
      kv.KeySlot(0, 0, t)[i] = Fp32ToFp16(k);
      kv.ValueSlot(0, 0, t)[i] = Fp32ToFp16(is_hot ? 1.0f : 0.0f);
    }
  }
  kv.Commit(kBlocks * kBlock);
  const float scale = 0.125f;
  const std::vector<double> mass = testing::BlockMasses(kv, q, scale);
  for (int w : wide) {
    for (int h : hot) ASSERT_GT(mass[h], 2 * mass[w]) << "the hot blocks hold more";
  }
  auto top = [&](AttentionPolicy::Rank rank) {
    std::vector<int> order = testing::CandidatesInOrder(kv, q, scale, rank);
    order.resize(hot.size());
    std::sort(order.begin(), order.end());
    return order;
  };
  EXPECT_EQ(top(AttentionPolicy::Rank::kEstimate), hot);
  const std::vector<int> by_bound = top(AttentionPolicy::Rank::kBound);
  EXPECT_NE(by_bound, hot);
  for (int b : by_bound) {
    EXPECT_TRUE(std::count(wide.begin(), wide.end(), b) > 0) << "block " << b;
  }
  // Top-k of three (and the forced two): the estimate's output is closer to dense's.
  const testing::Output ref =
      testing::Attend(DenseAttention(), AttentionShape{1, 1, kHeadDim, scale}, kv, q, 0);
  AttentionPolicy p = testing::TopK(2 + static_cast<int>(hot.size()));
  const testing::Output est =
      testing::Attend(SparseAttention(p), AttentionShape{1, 1, kHeadDim, scale}, kv, q, 0);
  p.rank = AttentionPolicy::Rank::kBound;
  const testing::Output bound =
      testing::Attend(SparseAttention(p), AttentionShape{1, 1, kHeadDim, scale}, kv, q, 0);
  EXPECT_LT(testing::RelErr(est.out, ref.out), 0.5 * testing::RelErr(bound.out, ref.out));
}

// kBound's group score is BlockBounds' (the largest bound); both rankings
// fill the heads' bounds and centre scores alike.
TEST(RankScoresTest, TheBoundIsTheGroupsLargestBound) {
  using testing::kHeadDim;
  KvCache kv = testing::RandomCache(1, 640, 16, 4);
  const std::vector<float> q = testing::RandomQuery(2, 9, 1.5f);
  const float* qs[] = {q.data(), q.data() + kHeadDim};
  const int n = kv.full_blocks() - 2;
  std::vector<float> ub(2 * n), centre(2 * n), g(n), ub2(2 * n), centre2(2 * n), g2(n);
  RankScores(kv.KeyBounds(0, 0), AttentionPolicy::Rank::kBound, qs, 2, 0.125f, 1, n, ub.data(),
             centre.data(), g.data());
  kv.KeyBounds(0, 0).Score(qs, 2, 0.125f, 1, n + 1, ub2.data(), n, g2.data(), centre2.data());
  EXPECT_EQ(g, g2);
  EXPECT_EQ(ub, ub2);
  EXPECT_EQ(centre, centre2);
  RankScores(kv.KeyBounds(0, 0), AttentionPolicy::Rank::kEstimate, qs, 2, 0.125f, 1, n,
             ub.data(), centre.data(), g.data());
  EXPECT_EQ(ub, ub2);
  EXPECT_EQ(centre, centre2);
  EXPECT_NE(g, g2);
}

}  // namespace
}  // namespace psa
