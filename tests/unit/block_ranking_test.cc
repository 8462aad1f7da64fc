// BlockRanking: its lazily produced order equals a full sort by descending
// score (ties to the lower index, NaN last), whatever the score pattern.
#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/attention/research/research_selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace psa {
namespace {

std::vector<int> FullSort(const std::vector<float>& s) {
  std::vector<int> order(s.size());
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int i) { return std::isnan(s[i]) ? -INFINITY : s[i]; };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
  return order;
}

void ExpectOrder(const std::vector<float>& s, const std::vector<int>& steps, const char* what) {
  BlockRanking r;
  r.Reset(s.data(), static_cast<int>(s.size()));
  const std::vector<int> want = FullSort(s);
  int final = 0;
  for (int upto : steps) {
    const int got = r.Extend(upto);
    EXPECT_GE(got, std::min<int>(upto, s.size())) << what;
    EXPECT_LE(got, static_cast<int>(s.size())) << what;
    EXPECT_GE(got, final) << what;
    final = got;
    for (int k = 0; k < final; ++k) ASSERT_EQ(r.order()[k], want[k]) << what << " rank " << k;
  }
}

TEST(BlockRankingTest, LazyOrderEqualsAFullSort) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int n : {0, 1, 7, 100, 5000}) {
    std::vector<float> s(n);
    for (float& x : s) x = g(rng);
    for (int i = 0; i < n; i += 5) s[i] = s[i / 2];  // ties
    for (int i = 0; i < n; i += 97) s[i] = 20 + i;   // hot blocks, far above
    ExpectOrder(s, {1, 3, 10, 64, 65, 1000, n}, "normal");
  }
}

TEST(BlockRankingTest, DegenerateScores) {
  ExpectOrder(std::vector<float>(300, 1.5f), {1, 300}, "all equal");
  std::vector<float> s(300);
  for (int i = 0; i < 300; ++i) s[i] = i % 3 == 0 ? NAN : i % 3 == 1 ? -INFINITY : INFINITY;
  s[10] = 4.0f;
  ExpectOrder(s, {1, 2, 150, 300}, "nan and infinities");
  std::vector<float> all_nan(64, NAN);
  ExpectOrder(all_nan, {64}, "all nan");
  std::vector<float> tiny(1000);
  for (int i = 0; i < 1000; ++i) tiny[i] = 1.0f + i * 1e-7f;  // a range of a few ulps
  ExpectOrder(tiny, {5, 1000}, "narrow range");
}

TEST(BlockRankingTest, ResetForgetsThePreviousCandidates) {
  BlockRanking r;
  std::vector<float> a = {3, 1, 2}, b = {0, 5, 4, 9};
  r.Reset(a.data(), 3);
  r.Extend(3);
  r.Reset(b.data(), 4);
  EXPECT_EQ(r.Extend(4), 4);
  EXPECT_EQ(r.order(), (std::vector<int>{3, 1, 2, 0}));
}

// The research ranking ",norm": head 0 is peaked (one block holds nearly
// all its mass), head 1 diffuse. By raw bounds (max over heads) head 0's
// runner-up outranks head 1's best block; by each head's own share, head
// 1's best block comes second.
TEST(BlockRankingTest, NormalizedGroupScoresRankEachHeadByItsOwnShare) {
  const int n = 4;
  const float ub[2][n] = {{20.0f, 9.0f, 0.0f, 0.0f},   // peaked, large scale
                          {1.0f, 1.0f, 1.5f, 1.0f}};  // diffuse, small scale
  float raw[n], norm[n];
  for (int c = 0; c < n; ++c) raw[c] = std::max(ub[0][c], ub[1][c]);
  NormalizedGroupScores(&ub[0][0], 2, n, norm);
  EXPECT_GT(raw[1], raw[2]);    // raw: head 0's runner-up first
  EXPECT_GT(norm[2], norm[1]);  // normalised: head 1's best first
  EXPECT_GT(norm[0], norm[2]);  // head 0's best stays first
  EXPECT_NEAR(norm[0], 0.0f, 1e-4f);  // it holds ~all of head 0's share: log 1
}

}  // namespace
}  // namespace psa
