// The attention kernels' building blocks against plain scalar arithmetic,
// including the masked tails (no write past n).
#include "compute_worker/kernels/fp16_kernels.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr float kSentinel = 12345.0f;

std::vector<float> Random(int n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

TEST(Fp16KernelsTest, ExpShiftSumIsExpAndSumAndStopsAtN) {
  for (int n : {1, 5, 15, 16, 17, 33, 100}) {
    std::vector<float> s = Random(n, n, -30.0f, 5.0f);
    const float max = *std::max_element(s.begin(), s.end());
    const std::vector<float> in = s;
    s.push_back(kSentinel);  // must survive
    const double sum = ExpShiftSum(s.data(), n, max);
    double want = 0;
    for (int i = 0; i < n; ++i) {
      const double e = std::exp(static_cast<double>(in[i] - max));  // the fp32 difference
      want += e;
      EXPECT_NEAR(s[i], e, 2e-7 * e + 1e-37) << "n " << n << " i " << i;
    }
    EXPECT_NEAR(sum, want, 1e-6 * want) << "n " << n;
    EXPECT_EQ(s[n], kSentinel) << "n " << n;
  }
}

TEST(Fp16KernelsTest, MaxF32AndScaleRoundToFp16MatchScalar) {
  for (int n : {1, 7, 16, 31, 64, 65}) {
    std::vector<float> s = Random(n, 100 + n, -50.0f, -1.0f);  // all negative
    EXPECT_EQ(MaxF32(s.data(), n), *std::max_element(s.begin(), s.end())) << "n " << n;
    std::vector<float> r = s;
    r.push_back(kSentinel);
    ScaleRoundToFp16(0.37f, r.data(), n);
    for (int i = 0; i < n; ++i) EXPECT_EQ(r[i], RoundToFp16(s[i] * 0.37f)) << "n " << n;
    EXPECT_EQ(r[n], kSentinel);
  }
}

TEST(Fp16KernelsTest, Fp16RowsConvertExactlyAtEveryLength) {
  for (int n : {1, 8, 15, 16, 17, 40}) {
    const std::vector<float> x = Random(n, 200 + n, -4.0f, 4.0f);
    std::vector<uint16_t> h(n);
    for (int i = 0; i < n; ++i) h[i] = Fp32ToFp16(x[i]);
    std::vector<float> out(n + 1, kSentinel);
    Fp16RowToFp32(h.data(), out.data(), n);
    for (int i = 0; i < n; ++i) EXPECT_EQ(out[i], Fp16ToFp32(h[i]));
    EXPECT_EQ(out[n], kSentinel);
  }
}

#if defined(__AVX512F__)
TEST(Fp16KernelsTest, Dot16Rows64IsSixteenDotProducts) {
  const std::vector<float> q = Random(64, 1, -1.0f, 1.0f);
  const std::vector<float> k = Random(16 * 64, 2, -1.0f, 1.0f);
  alignas(64) float got[16];
  _mm512_store_ps(got, Dot16Rows64(q.data(), k.data()));
  for (int j = 0; j < 16; ++j) {
    double want = 0;
    for (int i = 0; i < 64; ++i) want += static_cast<double>(q[i]) * k[j * 64 + i];
    EXPECT_NEAR(got[j], want, 1e-5) << "row " << j;
  }
}

// The decode kernels read fp16 rows straight from the cache; the prompt
// kernels convert them first. Both must give the same bits.
TEST(Fp16KernelsTest, Dot16RowsFp16x64EqualsDot16Rows64OnTheConvertedRows) {
  std::vector<uint16_t> kh(16 * 64);
  const std::vector<float> kr = Random(16 * 64, 3, -4.0f, 4.0f);
  for (size_t i = 0; i < kh.size(); ++i) kh[i] = Fp32ToFp16(kr[i]);
  std::vector<float> kf(16 * 64);
  Fp16RowToFp32(kh.data(), kf.data(), 16 * 64);
  std::vector<std::vector<float>> q;
  const float* qs[4];
  for (int g = 0; g < 4; ++g) {
    q.push_back(Random(64, 10 + g, -1.0f, 1.0f));
    qs[g] = q[g].data();
  }
  __m512 dots[4];
  Dot16RowsFp16x64<3>(qs, kh.data(), dots);  // the default model's group
  alignas(64) float got[16], want[16];
  for (int g = 0; g < 3; ++g) {
    _mm512_store_ps(got, dots[g]);
    _mm512_store_ps(want, Dot16Rows64(qs[g], kf.data()));
    for (int j = 0; j < 16; ++j) EXPECT_EQ(got[j], want[j]) << "head " << g << " row " << j;
  }
  Dot16RowsFp16x64<4>(qs, kh.data(), dots);
  _mm512_store_ps(got, dots[3]);
  _mm512_store_ps(want, Dot16Rows64(qs[3], kf.data()));
  for (int j = 0; j < 16; ++j) EXPECT_EQ(got[j], want[j]) << "head 3 row " << j;
}
#endif

}  // namespace
}  // namespace psa
