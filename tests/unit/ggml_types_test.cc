// Float conversions, quantisers and the dot-product kernels that read them.
#include "compute_worker/model/ggml_types.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "compute_worker/kernels/matmul.h"
#include "gtest/gtest.h"
#include "tests/unit/matmul_testing.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace psa {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool IsHalfNan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

// Reports at most a few mismatches of a sweep instead of thousands.
class MismatchLimiter {
 public:
  bool Report() { return ++count_ <= 5; }
  int count() const { return count_; }

 private:
  int count_ = 0;
};

TEST(Fp16Test, EveryHalfRoundTrips) {
  MismatchLimiter bad;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = Fp16ToFp32(static_cast<uint16_t>(h));
    const uint16_t back = Fp32ToFp16(f);
    const bool ok = IsHalfNan(h) ? std::isnan(f) && IsHalfNan(back) : back == h;
    if (!ok && bad.Report()) ADD_FAILURE() << std::hex << "half 0x" << h << " -> 0x" << back;
  }
  EXPECT_EQ(bad.count(), 0);
}

TEST(Fp16Test, Specials) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Fp32ToFp16(inf), 0x7c00);
  EXPECT_EQ(Fp32ToFp16(-inf), 0xfc00);
  EXPECT_TRUE(IsHalfNan(Fp32ToFp16(std::nanf(""))));
  EXPECT_EQ(Fp32ToFp16(-std::nanf("")) & 0x8000, 0x8000);
  // A NaN whose payload lives only in the low bits must not become inf.
  EXPECT_TRUE(IsHalfNan(Fp32ToFp16(FromBits(0x7f800001))));
  EXPECT_EQ(Fp32ToFp16(0.0f), 0x0000);
  EXPECT_EQ(Fp32ToFp16(-0.0f), 0x8000);

  // Largest finite half is 65504; the midpoint 65520 rounds (to even) to inf.
  EXPECT_EQ(Fp32ToFp16(65504.0f), 0x7bff);
  EXPECT_EQ(Fp32ToFp16(65519.0f), 0x7bff);
  EXPECT_EQ(Fp32ToFp16(65520.0f), 0x7c00);
  EXPECT_EQ(Fp32ToFp16(-1e10f), 0xfc00);

  // Subnormals: the half lsb is 2^-24; ties go to the even neighbour.
  EXPECT_EQ(Fp32ToFp16(0x1p-24f), 0x0001);
  EXPECT_EQ(Fp32ToFp16(-0x1p-24f), 0x8001);
  EXPECT_EQ(Fp32ToFp16(0x1p-25f), 0x0000);
  EXPECT_EQ(Fp32ToFp16(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(Fp32ToFp16(3 * 0x1p-25f), 0x0002);
  EXPECT_EQ(Fp32ToFp16(5 * 0x1p-25f), 0x0002);
  EXPECT_EQ(Fp32ToFp16(0x1p-14f - 0x1p-25f), 0x0400);  // rounds up to the smallest normal
  EXPECT_EQ(Fp32ToFp16(0x1p-14f), 0x0400);
  EXPECT_EQ(Fp32ToFp16(FromBits(1)), 0x0000);  // float subnormal

  // Normals: 10 mantissa bits, ties to even.
  EXPECT_EQ(Fp32ToFp16(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(Fp32ToFp16(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(Fp32ToFp16(1.0f + 0x1p-11f + 0x1p-23f), 0x3c01);
  EXPECT_EQ(Fp32ToFp16(2047.5f), 0x6800);  // tie between 2047 (0x67ff) and 2048
  EXPECT_EQ(Fp16ToFp32(0x6800), 2048.0f);

  EXPECT_EQ(Fp16ToFp32(0x0001), 0x1p-24f);
  EXPECT_EQ(Fp16ToFp32(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(Fp16ToFp32(0x7bff), 65504.0f);
  EXPECT_EQ(Fp16ToFp32(0x7c00), inf);
  EXPECT_EQ(Fp16ToFp32(0xfc00), -inf);
  EXPECT_TRUE(std::isnan(Fp16ToFp32(0x7e00)));
  EXPECT_TRUE(std::signbit(Fp16ToFp32(0x8000)));
}

#if defined(__F16C__)
// The hardware converter is the reference for round-to-nearest-even.
TEST(Fp16Test, MatchesF16cHardware) {
  MismatchLimiter bad;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float want = _cvtsh_ss(static_cast<uint16_t>(h));
    const float got = Fp16ToFp32(static_cast<uint16_t>(h));
    const bool ok = std::isnan(want) ? std::isnan(got) : Bits(got) == Bits(want);
    if (!ok && bad.Report()) ADD_FAILURE() << std::hex << "half 0x" << h;
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    // Bias towards the half range so rounding paths are exercised.
    uint32_t u = rng();
    if (i % 2) u = (u & 0x807fffffu) | ((100 + rng() % 45) << 23);
    const float f = FromBits(u);
    const uint16_t want = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    const uint16_t got = Fp32ToFp16(f);
    const bool ok = IsHalfNan(want) ? IsHalfNan(got) : got == want;
    if (!ok && bad.Report()) {
      ADD_FAILURE() << std::hex << "float 0x" << u << ": got 0x" << got << ", want 0x" << want;
    }
  }
  EXPECT_EQ(bad.count(), 0);
}
#endif

TEST(Bf16Test, EveryBf16RoundTrips) {
  MismatchLimiter bad;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = Bf16ToFp32(static_cast<uint16_t>(h));
    const uint16_t back = Fp32ToBf16(f);
    const bool ok = IsBf16Nan(h) ? std::isnan(f) && IsBf16Nan(back) : back == h;
    if (!ok && bad.Report()) ADD_FAILURE() << std::hex << "bf16 0x" << h << " -> 0x" << back;
  }
  EXPECT_EQ(bad.count(), 0);
}

TEST(Bf16Test, Specials) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Fp32ToBf16(inf), 0x7f80);
  EXPECT_EQ(Fp32ToBf16(-inf), 0xff80);
  EXPECT_TRUE(IsBf16Nan(Fp32ToBf16(std::nanf(""))));
  EXPECT_TRUE(IsBf16Nan(Fp32ToBf16(FromBits(0x7f800001))));  // must not become inf
  EXPECT_TRUE(IsBf16Nan(Fp32ToBf16(FromBits(0xffffffff))));
  EXPECT_EQ(Fp32ToBf16(-0.0f), 0x8000);
  EXPECT_EQ(Fp32ToBf16(FLT_MAX), 0x7f80);  // nearest-even of FLT_MAX is inf
  // Ties to even, normal and subnormal.
  EXPECT_EQ(Fp32ToBf16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(Fp32ToBf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_EQ(Fp32ToBf16(1.0f + 0x1p-8f + 0x1p-23f), 0x3f81);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x00008000)), 0x0000);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x00018000)), 0x0002);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x00008001)), 0x0001);
  EXPECT_EQ(Bf16ToFp32(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFp32(0xc040), -3.0f);
}

// A bf16 value with inf read as 2^128, the next step past the largest finite
// value: rounding to nearest treats overflow that way.
double Bf16Unbounded(uint16_t h) {
  if ((h & 0x7fff) == 0x7f80) return std::copysign(0x1p128, Bf16ToFp32(h));
  return Bf16ToFp32(h);
}

TEST(Bf16Test, RoundsToNearestEven) {
  std::mt19937 rng(11);
  MismatchLimiter bad;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = rng();
    const float f = FromBits(u);
    if (!std::isfinite(f)) continue;
    // The two bf16 candidates around f; pick the nearer, ties to even.
    const uint16_t lo = static_cast<uint16_t>(u >> 16), hi = static_cast<uint16_t>(lo + 1);
    const double d_lo = std::fabs(f - Bf16Unbounded(lo));
    const double d_hi = std::fabs(f - Bf16Unbounded(hi));
    const uint16_t want = d_lo < d_hi ? lo : d_hi < d_lo ? hi : (lo & 1 ? hi : lo);
    if (Fp32ToBf16(f) != want && bad.Report()) ADD_FAILURE() << std::hex << "float 0x" << u;
  }
  EXPECT_EQ(bad.count(), 0);
}

TEST(GgmlTypesTest, BlockAndRowBytes) {
  struct Row {
    GgmlType type;
    const char* name;
    int block_elements;
    size_t block_bytes;
    bool supported;
  };
  const Row rows[] = {
      {GgmlType::kF32, "F32", 1, 4, true},      {GgmlType::kF16, "F16", 1, 2, true},
      {GgmlType::kBF16, "BF16", 1, 2, true},    {GgmlType::kQ4_0, "Q4_0", 32, 18, true},
      {GgmlType::kQ4_1, "Q4_1", 32, 20, true},  {GgmlType::kQ8_0, "Q8_0", 32, 34, true},
      {GgmlType::kQ8_1, "Q8_1", 32, 36, false},  // activations only
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.name);
    EXPECT_EQ(TypeName(r.type), r.name);
    EXPECT_EQ(BlockElements(r.type), r.block_elements);
    EXPECT_EQ(BlockBytes(r.type), r.block_bytes);
    EXPECT_EQ(IsSupportedType(static_cast<uint32_t>(r.type)), r.supported);
    EXPECT_EQ(RowBytes(r.type, 4096), 4096 / r.block_elements * r.block_bytes);
    EXPECT_EQ(RowBytes(r.type, 96), 96 / r.block_elements * r.block_bytes);
  }
  // Q5_0 (6), Q5_1 (7) and the K-quants (12-14): kquant_types_test.
  for (uint32_t other : {4u, 5u, 10u, 11u, 15u, 29u, 31u, 0xffffffffu}) {
    EXPECT_FALSE(IsSupportedType(other)) << other;
  }
}

// Blocks of 32 that stress the quantisers: mixed signs, one sign only, tiny
// values (fp16 scales become subnormal), an outlier, constant, zero.
std::vector<float> TestRow(std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x;
  for (int kind = 0; kind < 8; ++kind) {
    for (int j = 0; j < kQK; ++j) {
      const float r = u(rng);
      switch (kind) {
        case 0:
          x.push_back(r);
          break;
        case 1:
          x.push_back(3.0f + 2.0f * r);
          break;
        case 2:
          x.push_back(-std::fabs(r) * 50.0f);
          break;
        case 3:
          x.push_back(r * 1e-3f);
          break;
        case 4:
          x.push_back(j == 7 ? 100.0f : r * 0.01f);
          break;
        case 5:
          x.push_back(-0.75f);
          break;
        case 6:
          x.push_back(0.0f);
          break;
        default:
          x.push_back(r * 1e4f);
          break;
      }
    }
  }
  return x;
}

// Per-block worst-case error of QuantizeRow + DequantizeRow. With d the
// exact step, d16 its stored fp16 value and q_max the largest code magnitude:
//   Q8_0, Q8_1: |x - x'| <= d/2 + 127 |d - d16|          (d = amax / 127)
//   Q4_1:       |x - x'| <= d/2 + 15 |d - d16| + |min - m16|  (d = range / 15)
//   Q4_0:       |x - x'| <= |d|/2 + 8 |d - d16|          (d = -max / 8)
//               except a value of the opposite sign to the block's largest
//               beyond 7.5|d|, which clamps to code 15: |d| + 8 |d - d16|.
// plus a few float ulps of the block's magnitude for the arithmetic itself.
TEST(QuantizeTest, ErrorBounds) {
  std::mt19937 rng(3);
  for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kQ8_1}) {
    SCOPED_TRACE(std::string(TypeName(type)));
    for (int trial = 0; trial < 20; ++trial) {
      const std::vector<float> x = TestRow(rng);
      const int64_t n = static_cast<int64_t>(x.size());
      std::vector<uint8_t> q(RowBytes(type, n));
      QuantizeRow(type, x.data(), q.data(), n);
      std::vector<float> y(n);
      DequantizeRow(type, q.data(), y.data(), n);
      for (int64_t b = 0; b < n / kQK; ++b) {
        const float* xb = &x[b * kQK];
        const uint8_t* block = q.data() + b * BlockBytes(type);
        uint16_t d16_bits;
        std::memcpy(&d16_bits, block, 2);  // every block starts with fp16 d
        const double d16 = Fp16ToFp32(d16_bits);
        float amax = 0, max = 0, lo = xb[0], hi = xb[0];
        for (int j = 0; j < kQK; ++j) {
          if (std::fabs(xb[j]) > amax) amax = std::fabs(xb[j]), max = xb[j];
          lo = std::min(lo, xb[j]);
          hi = std::max(hi, xb[j]);
        }
        const double slack = 8 * FLT_EPSILON * std::max(std::fabs(lo), std::fabs(hi));
        for (int j = 0; j < kQK; ++j) {
          const double err = std::fabs(static_cast<double>(xb[j]) - y[b * kQK + j]);
          double bound = 0;
          if (type == GgmlType::kQ8_0 || type == GgmlType::kQ8_1) {
            const double d = amax / 127.0;
            bound = d / 2 + 127 * std::fabs(d - d16);
          } else if (type == GgmlType::kQ4_1) {
            uint16_t m16_bits;
            std::memcpy(&m16_bits, block + 2, 2);
            const double d = (static_cast<double>(hi) - lo) / 15;
            bound = d / 2 + 15 * std::fabs(d - d16) + std::fabs(lo - Fp16ToFp32(m16_bits));
          } else {
            const double d = max / -8.0;
            const bool clamped = d != 0 && xb[j] / d > 7.5;
            bound = (clamped ? std::fabs(d) : std::fabs(d) / 2) + 8 * std::fabs(d - d16);
          }
          ASSERT_LE(err, bound + slack)
              << "block " << b << " element " << j << ": " << xb[j] << " -> " << y[b * kQK + j];
        }
        if (amax == 0) {
          for (int j = 0; j < kQK; ++j) EXPECT_EQ(y[b * kQK + j], 0.0f);
        }
        if (type == GgmlType::kQ8_1) {  // s = d * sum(qs), as ggml defines it
          const auto* q81 = reinterpret_cast<const BlockQ8_1*>(block);
          int sum = 0;
          for (int j = 0; j < kQK; ++j) sum += q81->qs[j];
          EXPECT_EQ(q81->s, Fp32ToFp16(amax / 127 * sum)) << "block " << b;
        }
      }
    }
  }
}

TEST(QuantizeTest, FloatTypesConvertElementwise) {
  std::mt19937 rng(5);
  const std::vector<float> x = TestRow(rng);
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint16_t> h(n), b(n);
  std::vector<float> f(n), y(n);
  QuantizeRow(GgmlType::kF16, x.data(), h.data(), n);
  QuantizeRow(GgmlType::kBF16, x.data(), b.data(), n);
  QuantizeRow(GgmlType::kF32, x.data(), f.data(), n);
  EXPECT_EQ(f, x);
  DequantizeRow(GgmlType::kF16, h.data(), y.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(h[i], Fp32ToFp16(x[i]));
    ASSERT_EQ(y[i], Fp16ToFp32(h[i]));
  }
  DequantizeRow(GgmlType::kBF16, b.data(), y.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(b[i], Fp32ToBf16(x[i]));
    ASSERT_EQ(y[i], Bf16ToFp32(b[i]));
  }
}

constexpr GgmlType kWeightTypes[] = {GgmlType::kQ4_1, GgmlType::kQ4_0, GgmlType::kQ8_0,
                                     GgmlType::kF16,  GgmlType::kBF16, GgmlType::kF32};

// DotRow against a double-precision dot of the dequantised operands. Both
// use the same quantised values, so only float accumulation differs, except
// that the Q4_1 kernel folds the weight minimum in through the activation
// block's stored s = fp16(d * sum(q)) rather than d16 * sum(q): that gap,
// |m16| * |s16 - d16 * sum(q)| per block, is added to the tolerance.
TEST(DotRowTest, MatchesDequantisedReference) {
  std::mt19937 rng(9);
  for (GgmlType type : kWeightTypes) {
    for (int64_t cols : {32, 96, 256, 4096}) {
      SCOPED_TRACE(std::string(TypeName(type)) + " x " + std::to_string(cols));
      const std::vector<uint8_t> w =
          testing::Quantize(type, testing::RandomValues(rng, cols, 1.0f), 1, cols);
      const std::vector<float> x = testing::RandomValues(rng, cols, 2.0f);
      PackedActivations packed;
      PackActivations(type, x.data(), 1, cols, cols, &packed);
      ASSERT_EQ(packed.type, ActivationTypeFor(type));

      std::vector<float> wf(cols), xf(cols);
      DequantizeRow(type, w.data(), wf.data(), cols);
      DequantizeRow(packed.type, packed.row(0), xf.data(), cols);
      double want = 0, magnitude = 0;
      for (int64_t i = 0; i < cols; ++i) {
        want += static_cast<double>(wf[i]) * xf[i];
        magnitude += std::fabs(static_cast<double>(wf[i]) * xf[i]);
      }
      double tolerance = 1e-5 * magnitude + 1e-6;
      if (type == GgmlType::kQ4_1) {
        const auto* wb = reinterpret_cast<const BlockQ4_1*>(w.data());
        const auto* xb = reinterpret_cast<const BlockQ8_1*>(packed.row(0));
        for (int64_t b = 0; b < cols / kQK; ++b) {
          int sum = 0;
          for (int j = 0; j < kQK; ++j) sum += xb[b].qs[j];
          tolerance += std::fabs(Fp16ToFp32(wb[b].m)) *
                       std::fabs(Fp16ToFp32(xb[b].s) - Fp16ToFp32(xb[b].d) * sum);
        }
      }
      EXPECT_NEAR(DotRow(type, w.data(), packed.row(0), cols), want, tolerance);
    }
  }
}

// MatMul over token batches of every size the kernels special-case (groups
// of 4 plus a tail) and over row ranges, against DotRow per element: batching
// must not change any result, and nothing outside the range may be written.
TEST(MatMulTest, EqualsDotRowPerElement) {
  constexpr int64_t kRows = 40, kCols = 64, kLdx = kCols + 5, kLdy = kRows + 3;
  std::mt19937 rng(13);
  for (GgmlType type : kWeightTypes) {
    const std::vector<uint8_t> data =
        testing::Quantize(type, testing::RandomValues(rng, kRows * kCols, 1.0f), kRows, kCols);
    const WeightMatrix w = testing::MakeWeightMatrix(type, data, kRows, kCols);
    for (int n = 1; n <= 9; ++n) {
      const std::vector<float> x = testing::RandomValues(rng, n * kLdx, 1.0f);
      PackedActivations packed;
      PackActivations(type, x.data(), n, kCols, kLdx, &packed);
      for (auto [begin, end] :
           {std::pair<int64_t, int64_t>{0, -1}, {3, 37}, {16, 32}, {39, 40}, {5, 5}}) {
        testing::ExpectMatMulEqualsDotRow(w, packed, kLdy, begin, end);
      }
    }
  }
}

}  // namespace
}  // namespace psa
