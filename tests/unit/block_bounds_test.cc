// BlockBounds: the 8-bit box bound is still an upper bound of every key's
// score (the certified stop relies on it), stays close to the exact fp16
// box bound, the 8-bit mean-key score close to the exact one, and it writes
// exactly the requested range.
#include "compute_worker/kv/block_bounds.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr float kSentinel = 12345.0f;

// n blocks of 16 random keys (a per-block offset and spread, so the boxes
// differ in centre and width), their fp16 max/min/mean, and the table.
struct Blocks {
  int d;
  std::vector<std::vector<float>> keys;  // [block][16 * d], fp16-exact
  std::vector<uint16_t> kmax, kmin, kmean;  // [block][d]
  BlockBounds table;
  Blocks(int n, int dim, uint32_t seed) : d(dim), table(dim) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(0.0f, 3.0f);
    table.Reserve(n);
    kmax.resize(static_cast<size_t>(n) * d);
    kmin.resize(kmax.size());
    kmean.resize(kmax.size());
    for (int b = 0; b < n; ++b) {
      const float spread = b % 7 == 0 ? 0.0f : u(rng);  // some zero-width boxes
      std::vector<float> offset(d);
      for (float& o : offset) o = 2 * g(rng);
      std::vector<float> k(16 * d);
      for (int t = 0; t < 16; ++t)
        for (int i = 0; i < d; ++i)
          k[t * d + i] = Fp16ToFp32(Fp32ToFp16(offset[i] + spread * g(rng)));
      for (int i = 0; i < d; ++i) {
        float hi = -INFINITY, lo = INFINITY, sum = 0;
        for (int t = 0; t < 16; ++t) {
          hi = std::max(hi, k[t * d + i]);
          lo = std::min(lo, k[t * d + i]);
          sum += k[t * d + i];
        }
        kmax[static_cast<size_t>(b) * d + i] = Fp32ToFp16(hi);
        kmin[static_cast<size_t>(b) * d + i] = Fp32ToFp16(lo);
        kmean[static_cast<size_t>(b) * d + i] = Fp32ToFp16(sum / 16);
      }
      keys.push_back(k);
      const size_t at = static_cast<size_t>(b) * d;
      table.Set(b, &kmax[at], &kmin[at], &kmean[at]);
    }
  }
  // scale * max over the fp16 box of q.k, in double.
  double BoxBound(const float* q, int b, float scale) const {
    double s = 0;
    for (int i = 0; i < d; ++i) s += std::max(q[i] * Hi(b, i), q[i] * Lo(b, i));
    return s * scale;
  }
  // scale * sum_i |q_i| * max(|kmax_i|, |kmin_i|): the bound's magnitude.
  double Magnitude(const float* q, int b, float scale) const {
    double s = 0;
    for (int i = 0; i < d; ++i) s += std::fabs(q[i]) * std::max(std::fabs(Hi(b, i)), std::fabs(Lo(b, i)));
    return s * scale;
  }
  // How far above the box bound rounding to 8-bit steps may take it: the
  // query off by <= its step / 2 per dim against the box's centre and
  // radius, and the box widened by <= a centre step and a radius step.
  double RoundingAllowance(const float* q, int b, float scale) const {
    double qmax = 0, cmax = 0, rmax = 0;
    for (int i = 0; i < d; ++i) {
      qmax = std::max(qmax, std::fabs(static_cast<double>(q[i])));
      cmax = std::max(cmax, std::fabs(Hi(b, i) + Lo(b, i)) / 2);
      rmax = std::max(rmax, (Hi(b, i) - Lo(b, i)) / 2);
    }
    const double qstep = qmax / 127, cstep = cmax / 127, rstep = (rmax + cstep) / 255;
    double s = 0;
    for (int i = 0; i < d; ++i) {
      const double c = std::fabs(Hi(b, i) + Lo(b, i)) / 2, r = (Hi(b, i) - Lo(b, i)) / 2;
      s += qstep * (c + r + 2 * (cstep + rstep)) + std::fabs(q[i]) * (cstep + rstep);
    }
    return s * scale;
  }
  double Mean(int b, int i) const { return Fp16ToFp32(kmean[static_cast<size_t>(b) * d + i]); }
  double Hi(int b, int i) const { return Fp16ToFp32(kmax[static_cast<size_t>(b) * d + i]); }
  double Lo(int b, int i) const { return Fp16ToFp32(kmin[static_cast<size_t>(b) * d + i]); }
};

TEST(BlockBoundsTest, BoundsEveryKeyAndTheBoxWithinAFewPercent) {
  for (int d : {64, 128, 10}) {  // 10: a zero-padded last group of 4 dims
    for (int group : {1, 3, 5}) {  // 5: more heads than one pass of the kernel
      const int n = 45;            // three tiles, the last partial
      Blocks blocks(n, d, 100 * d + group);
      std::mt19937 rng(d + group);
      std::normal_distribution<float> g(0.0f, 1.0f);
      std::vector<std::vector<float>> q(group, std::vector<float>(d));
      for (auto& qh : q) {
        for (float& x : qh) x = g(rng);
        qh[0] *= 8;  // an outlier dimension, as real queries have
      }
      const float* qs[8];
      for (int h = 0; h < group; ++h) qs[h] = q[h].data();
      const float scale = 0.125f;
      std::vector<float> ub(static_cast<size_t>(group) * n), gscore(n);
      blocks.table.Score(qs, group, scale, 0, n, ub.data(), n, gscore.data());
      for (int b = 0; b < n; ++b) {
        float best = -INFINITY;
        for (int h = 0; h < group; ++h) {
          const float u = ub[static_cast<size_t>(h) * n + b];
          best = std::max(best, u);
          const double box = blocks.BoxBound(qs[h], b, scale);
          // Above the exact box bound (the guarantee)...
          EXPECT_GE(u, box - 1e-5 * blocks.Magnitude(qs[h], b, scale))
              << "d " << d << " block " << b << " head " << h;
          // ... and so above every key's score ...
          for (int t = 0; t < 16; ++t) {
            double s = 0;
            for (int i = 0; i < d; ++i) s += qs[h][i] * blocks.keys[b][t * d + i];
            EXPECT_GE(u, s * scale - 1e-5 * blocks.Magnitude(qs[h], b, scale));
          }
          // ... but not by more than the rounding to 8-bit steps allows.
          EXPECT_LE(u, box + blocks.RoundingAllowance(qs[h], b, scale))
              << "d " << d << " block " << b << " head " << h;
        }
        EXPECT_EQ(gscore[b], best);
      }
    }
  }
}

TEST(BlockBoundsTest, MeanKeyScoresWithinTheirRounding) {
  for (int d : {64, 128, 10}) {
    for (int group : {1, 3, 4, 7}) {  // 4 and 7: more heads than one pass with the mean
      const int n = 45;
      Blocks blocks(n, d, 7 * d + group);
      std::mt19937 rng(d * group);
      std::normal_distribution<float> g(0.0f, 1.0f);
      std::vector<std::vector<float>> q(group, std::vector<float>(d));
      for (auto& qh : q) {
        for (float& x : qh) x = g(rng);
      }
      const float* qs[8];
      for (int h = 0; h < group; ++h) qs[h] = q[h].data();
      const float scale = 0.125f;
      std::vector<float> ub(static_cast<size_t>(group) * n), gscore(n), centre(ub.size()),
          mean(ub.size());
      blocks.table.Score(qs, group, scale, 0, n, ub.data(), n, gscore.data(), centre.data(),
                         mean.data());
      // The same bounds and centre scores as without the mean.
      std::vector<float> ub2(ub.size()), gscore2(n), centre2(ub.size());
      blocks.table.Score(qs, group, scale, 0, n, ub2.data(), n, gscore2.data(), centre2.data());
      EXPECT_EQ(ub, ub2);
      EXPECT_EQ(gscore, gscore2);
      EXPECT_EQ(centre, centre2);
      for (int b = 0; b < n; ++b) {
        double mmax = 0;
        for (int i = 0; i < d; ++i) mmax = std::max(mmax, std::fabs(blocks.Mean(b, i)));
        for (int h = 0; h < group; ++h) {
          double exact = 0, qmax = 0, l1q = 0, l1m = 0;
          for (int i = 0; i < d; ++i) {
            exact += qs[h][i] * blocks.Mean(b, i);
            qmax = std::max(qmax, std::fabs(static_cast<double>(qs[h][i])));
            l1q += std::fabs(qs[h][i]);
            l1m += std::fabs(blocks.Mean(b, i));
          }
          // Each side off by <= half its 8-bit step per dim.
          const double allow = (qmax / 254 * (l1m + mmax / 254 * d) + mmax / 254 * l1q) * scale;
          EXPECT_NEAR(mean[static_cast<size_t>(h) * n + b], exact * scale, allow + 1e-6)
              << "d " << d << " block " << b << " head " << h;
        }
      }
    }
  }
}

TEST(BlockBoundsTest, ScoresExactlyTheRangeAsked) {
  const int n = 50, group = 3;
  Blocks blocks(n, 64, 9);
  std::vector<float> q(group * 64, 0.5f);
  const float* qs[] = {q.data(), q.data() + 64, q.data() + 128};
  std::vector<float> all(static_cast<size_t>(group) * n), all_g(n);
  blocks.table.Score(qs, group, 1.0f, 0, n, all.data(), n, all_g.data());
  for (auto [first, last] : {std::pair{5, 37}, {16, 32}, {17, 18}, {33, 50}, {7, 7}}) {
    const int m = last - first, stride = m + 3;  // a stride wider than the range
    std::vector<float> ub(static_cast<size_t>(group) * stride + 1, kSentinel), gscore(m + 1, kSentinel);
    blocks.table.Score(qs, group, 1.0f, first, last, ub.data(), stride, gscore.data());
    for (int h = 0; h < group; ++h) {
      for (int c = 0; c < stride; ++c) {
        const float got = ub[static_cast<size_t>(h) * stride + c];
        if (c < m) {
          EXPECT_EQ(got, all[static_cast<size_t>(h) * n + first + c]) << first << ".." << last;
        } else {
          EXPECT_EQ(got, kSentinel) << "wrote past the range " << first << ".." << last;
        }
      }
    }
    for (int c = 0; c <= m; ++c) EXPECT_EQ(gscore[c], c < m ? all_g[first + c] : kSentinel);
    EXPECT_EQ(ub.back(), kSentinel);
    // Without per-head bounds (a null ub): the same group scores.
    std::vector<float> g_only(m + 1, kSentinel);
    blocks.table.Score(qs, group, 1.0f, first, last, nullptr, stride, g_only.data());
    EXPECT_EQ(g_only, gscore);
  }
}

TEST(BlockBoundsTest, CentreRoundingIsCoveredByTheRadius) {
  // One key (a zero-width box) whose small dims all round to 0 in steps
  // of its large one, read by a query that weighs only those dims: the
  // rounding errors add up, and only the widened radius covers them.
  std::vector<uint16_t> k(64, Fp32ToFp16(0.49f));
  k[0] = Fp32ToFp16(127.0f);
  BlockBounds table(64);
  table.Reserve(1);
  table.Set(0, k.data(), k.data(), k.data());
  std::vector<float> q(64, 1.0f);
  q[0] = 0.0f;
  double exact = 0;
  for (int i = 0; i < 64; ++i) exact += q[i] * Fp16ToFp32(k[i]);
  const float* qs[] = {q.data()};
  float ub, gscore;
  table.Score(qs, 1, 1.0f, 0, 1, &ub, 1, &gscore);
  EXPECT_GE(ub, exact * (1 - 1e-6));
}

TEST(BlockBoundsTest, AZeroQueryScoresZero) {
  Blocks blocks(20, 64, 3);
  std::vector<float> q(64, 0.0f), ub(20), gscore(20);
  const float* qs[] = {q.data()};
  blocks.table.Score(qs, 1, 0.125f, 0, 20, ub.data(), 20, gscore.data());
  for (float u : ub) EXPECT_EQ(u, 0.0f);
}

}  // namespace
}  // namespace psa
