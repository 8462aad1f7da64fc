// The Q5_0 / Q5_1 / K-quant block layouts and quantisers: sizes, hand-built
// blocks decoded to known values, round-trip error bounds, and Q8_K's
// bit-exact agreement with ggml's reference quantiser.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr uint16_t kHalfOne = 0x3C00, kHalfHalf = 0x3800, kHalfQuarter = 0x3400;
constexpr uint16_t kHalfMinusTwo = 0xC000;

TEST(KQuantTypesTest, BlockAndRowBytes) {
  struct Row {
    GgmlType type;
    uint32_t id;
    const char* name;
    int block_elements;
    size_t block_bytes;
    bool supported;
  };
  const Row rows[] = {
      {GgmlType::kQ5_0, 6, "Q5_0", 32, 22, true},    {GgmlType::kQ5_1, 7, "Q5_1", 32, 24, true},
      {GgmlType::kQ4_K, 12, "Q4_K", 256, 144, true}, {GgmlType::kQ5_K, 13, "Q5_K", 256, 176, true},
      {GgmlType::kQ6_K, 14, "Q6_K", 256, 210, true},
      {GgmlType::kQ8_K, 15, "Q8_K", 256, 292, false},  // activations only
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.name);
    EXPECT_EQ(static_cast<uint32_t>(r.type), r.id);
    EXPECT_EQ(TypeName(r.type), r.name);
    EXPECT_EQ(BlockElements(r.type), r.block_elements);
    EXPECT_EQ(BlockBytes(r.type), r.block_bytes);
    EXPECT_EQ(IsSupportedType(r.id), r.supported);
    EXPECT_EQ(RowBytes(r.type, 4864), 4864 / r.block_elements * r.block_bytes);
    if (r.supported) {
      EXPECT_NE(SupportedTypeNames().find(r.name), std::string_view::npos);
    }
  }
  for (uint32_t other : {4u, 5u, 10u, 11u, 16u, 17u}) EXPECT_FALSE(IsSupportedType(other)) << other;
}

std::vector<float> Decode(GgmlType type, const void* block, int64_t n) {
  std::vector<float> out(n);
  DequantizeRow(type, block, out.data(), n);
  return out;
}

TEST(KQuantLayoutTest, Q5_0) {
  BlockQ5_0 b;
  b.d = kHalfHalf;
  const uint32_t qh = 0x80010003u;  // fifth bits of elements 0, 1, 16, 31
  std::memcpy(b.qh, &qh, 4);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const std::vector<float> y = Decode(GgmlType::kQ5_0, &b, 32);
  EXPECT_EQ(y[0], 0.0f);      // (0 | 16) - 16
  EXPECT_EQ(y[1], 0.5f);      // (1 | 16) - 16 = 1, times d = 0.5
  EXPECT_EQ(y[2], -7.0f);     // 2 - 16
  EXPECT_EQ(y[16], 7.5f);     // (15 | 16) - 16 = 15
  EXPECT_EQ(y[17], -1.0f);    // 14 - 16
  EXPECT_EQ(y[31], 0.0f);     // (0 | 16) - 16
  for (int j = 0; j < 32; ++j) {
    const int nibble = j < 16 ? j : 15 - (j - 16);
    const int fifth = static_cast<int>((qh >> j) & 1);
    EXPECT_EQ(y[j], ((nibble | (fifth << 4)) - 16) * 0.5f) << j;
  }
}

TEST(KQuantLayoutTest, Q5_1) {
  BlockQ5_1 b;
  b.d = kHalfHalf;
  b.m = kHalfMinusTwo;
  const uint32_t qh = 0x00000100u | (1u << 20);  // elements 8 and 20
  std::memcpy(b.qh, &qh, 4);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>((j & 7) | (3 << 4));
  const std::vector<float> y = Decode(GgmlType::kQ5_1, &b, 32);
  EXPECT_EQ(y[0], -2.0f);   // 0 * 0.5 - 2
  EXPECT_EQ(y[8], 6.0f);    // (0 | 16) * 0.5 - 2
  EXPECT_EQ(y[9], -1.5f);   // 1 * 0.5 - 2
  EXPECT_EQ(y[16], -0.5f);  // 3 * 0.5 - 2
  EXPECT_EQ(y[20], 7.5f);   // (3 | 16) * 0.5 - 2
}

// 6-bit scales and minimums with high bits set in the packed upper half:
// sc = {1, 2, 3, 63, 17, 33, 48, 5}, m = {0, 1, 62, 7, 20, 40, 63, 9},
// packed by hand from the format's rule.
constexpr uint8_t kSc[8] = {1, 2, 3, 63, 17, 33, 48, 5};
constexpr uint8_t kM[8] = {0, 1, 62, 7, 20, 40, 63, 9};
constexpr uint8_t kPackedScales[12] = {65, 130, 195, 63, 64, 129, 254, 7, 65, 129, 240, 149};

TEST(KQuantLayoutTest, Q4KScalesUnpack) {
  uint8_t sc[8], m[8];
  DecodeQ4KScales(kPackedScales, sc, m);
  for (int j = 0; j < 8; ++j) {
    EXPECT_EQ(sc[j], kSc[j]) << j;
    EXPECT_EQ(m[j], kM[j]) << j;
  }
}

// Q4_K with qs[32c + l] = (l & 15) | ((l + c) & 15) << 4: element 64c + l
// has code l & 15 (sub-block 2c), 64c + 32 + l code (l + c) & 15 (2c + 1).
TEST(KQuantLayoutTest, Q4_K) {
  BlockQ4_K b;
  b.d = kHalfOne;
  b.dmin = kHalfHalf;
  std::memcpy(b.scales, kPackedScales, 12);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      b.qs[32 * c + l] = static_cast<uint8_t>((l & 15) | (((l + c) & 15) << 4));
    }
  }
  const std::vector<float> y = Decode(GgmlType::kQ4_K, &b, 256);
  EXPECT_EQ(y[0], 0.0f);                 // 1 * 0 - 0.5 * 0
  EXPECT_EQ(y[35], 2 * 3 - 0.5f * 1);    // sub-block 1, code 3
  EXPECT_EQ(y[64 + 5], 3 * 5 - 31.0f);   // sub-block 2
  EXPECT_EQ(y[128 + 1], 17 * 1 - 10.0f);  // sub-block 4: packed high bits
  EXPECT_EQ(y[192 + 32 + 14], 5 * 1 - 4.5f);  // sub-block 7, code (14 + 3) & 15
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      EXPECT_EQ(y[64 * c + l], kSc[2 * c] * (l & 15) - 0.5f * kM[2 * c]);
      EXPECT_EQ(y[64 * c + 32 + l], kSc[2 * c + 1] * ((l + c) & 15) - 0.5f * kM[2 * c + 1]);
    }
  }
}

// Q5_K: as Q4_K's block, plus qh[l] = l ^ 0xA5: bit j of qh[l] is the
// fifth bit of element 32j + l.
TEST(KQuantLayoutTest, Q5_K) {
  BlockQ5_K b;
  b.d = kHalfOne;
  b.dmin = kHalfHalf;
  std::memcpy(b.scales, kPackedScales, 12);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      b.qs[32 * c + l] = static_cast<uint8_t>((l & 15) | (((l + c) & 15) << 4));
    }
  }
  for (int l = 0; l < 32; ++l) b.qh[l] = static_cast<uint8_t>(l ^ 0xA5);
  const std::vector<float> y = Decode(GgmlType::kQ5_K, &b, 256);
  EXPECT_EQ(y[0], 16.0f);  // qh[0] = 0xA5 has bit 0: code 16, times sc 1
  EXPECT_EQ(y[32], 0 - 0.5f);  // bit 1 of 0xA5 clear: code 0 in sub-block 1
  EXPECT_EQ(y[64 + 2], 3 * (2 | 16) - 31.0f);  // qh[2] = 0xA7, bit 2 set
  for (int j = 0; j < 8; ++j) {
    for (int l = 0; l < 32; ++l) {
      const int nibble = j % 2 == 0 ? (l & 15) : ((l + j / 2) & 15);
      const int code = nibble | ((((l ^ 0xA5) >> j) & 1) << 4);
      EXPECT_EQ(y[32 * j + l], kSc[j] * code - 0.5f * kM[j]) << j << " " << l;
    }
  }
}

// Q6_K with ql[i] = i, qh[i] = 3 * i, scales[g] = g - 8 and d = 1/4,
// decoded by the format's rule written out element by element.
TEST(KQuantLayoutTest, Q6_K) {
  BlockQ6_K b;
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>(i * 7 + 1);
  for (int i = 0; i < 64; ++i) b.qh[i] = static_cast<uint8_t>(3 * i + 17);
  for (int g = 0; g < 16; ++g) b.scales[g] = static_cast<int8_t>(g == 15 ? -128 : g - 8);
  b.d = kHalfQuarter;
  const std::vector<float> y = Decode(GgmlType::kQ6_K, &b, 256);
  // Element 0: ql[0] = 1, qh[0] = 17 (bits 0-1 = 1): code 1 | 16 = 17 - 32
  // = -15, scale 0 - 8 = -8: 0.25 * -8 * -15 = 30.
  EXPECT_EQ(y[0], 30.0f);
  // Element 64: ql[0] >> 4 = 0, (17 >> 4) & 3 = 1: code 16 - 32 = -16,
  // scale group 4: -4. 0.25 * -4 * -16 = 16.
  EXPECT_EQ(y[64], 16.0f);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, r = e % 128, l = r % 32, quarter = r / 32;
    const uint8_t low = b.ql[64 * h + l + (quarter % 2) * 32];
    const int nibble = quarter < 2 ? low & 15 : low >> 4;
    const int top = (b.qh[32 * h + l] >> (2 * quarter)) & 3;
    const float want = 0.25f * b.scales[e / 16] * ((nibble | (top << 4)) - 32);
    EXPECT_EQ(y[e], want) << e;
  }
}

TEST(KQuantLayoutTest, Q8_K) {
  BlockQ8_K b;
  b.d = -0.125f;
  for (int j = 0; j < 256; ++j) b.qs[j] = static_cast<int8_t>(j - 128);
  const std::vector<float> y = Decode(GgmlType::kQ8_K, &b, 256);
  EXPECT_EQ(y[0], 16.0f);
  EXPECT_EQ(y[255], -0.125f * 127);
}

// Quantisers whose rounding is ggml's: exact codes for exact inputs.
TEST(KQuantizeTest, Q5ExactBytes) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);  // max -16: d = 1
  BlockQ5_0 b;
  QuantizeRow(GgmlType::kQ5_0, x.data(), &b, 32);
  EXPECT_EQ(b.d, kHalfOne);
  uint32_t qh;
  std::memcpy(&qh, b.qh, 4);
  EXPECT_EQ(qh, 0xFFFF0000u);  // codes 16..31 are elements 16..31
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b.qs[j], j | (j << 4)) << j;
  EXPECT_EQ(Decode(GgmlType::kQ5_0, &b, 32), x);

  for (int j = 0; j < 32; ++j) x[j] = 0.5f * j - 2;  // range 15.5 / 31 = 0.5
  BlockQ5_1 b1;
  QuantizeRow(GgmlType::kQ5_1, x.data(), &b1, 32);
  EXPECT_EQ(b1.d, kHalfHalf);
  EXPECT_EQ(b1.m, kHalfMinusTwo);
  EXPECT_EQ(Decode(GgmlType::kQ5_1, &b1, 32), x);
}

// ggml's quantize_row_q8_K_ref restated: scale from the signed value of
// largest magnitude (the first, on ties), codes to nearest even.
TEST(KQuantizeTest, Q8KMatchesGgmlReference) {
  std::vector<float> x(512, 0.0f);
  x[0] = -127;  // iscale = 1, d = 1
  x[1] = 2.5f;
  x[2] = 3.5f;
  x[3] = -2.5f;
  x[4] = 0.5f;
  x[5] = 100.4f;
  x[6] = 127;  // equal magnitude, later: not the max
  for (int j = 256; j < 512; ++j) x[j] = (j % 7) * 0.25f;  // max 1.5 > 0: d < 0
  std::vector<BlockQ8_K> b(2);
  QuantizeRow(GgmlType::kQ8_K, x.data(), b.data(), 512);
  EXPECT_EQ(b[0].d, 1.0f);
  const int8_t want[7] = {-127, 2, 4, -2, 0, 100, 127};
  for (int j = 0; j < 7; ++j) EXPECT_EQ(b[0].qs[j], want[j]) << j;
  EXPECT_EQ(b[0].bsums[0], -127 + 2 + 4 - 2 + 0 + 100 + 127);
  EXPECT_EQ(b[1].d, 1 / (-127.0f / 1.5f));
  EXPECT_EQ(b[1].qs[2], -127);  // element 258, the first 1.5

  std::mt19937 rng(17);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (float& v : x) v = u(rng);
  std::fill(x.begin() + 256, x.end(), 0.0f);  // an all-zero block: all zeros
  QuantizeRow(GgmlType::kQ8_K, x.data(), b.data(), 512);
  float amax = 0, max = 0;
  for (int j = 0; j < 256; ++j) {
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), max = x[j];
  }
  const float iscale = -127.0f / max;
  EXPECT_EQ(b[0].d, 1 / iscale);
  for (int g = 0; g < 16; ++g) {
    int sum = 0;
    for (int j = 16 * g; j < 16 * g + 16; ++j) {
      const int q = std::min(127, static_cast<int>(std::nearbyint(iscale * x[j])));
      EXPECT_EQ(b[0].qs[j], q) << j;
      sum += q;
    }
    EXPECT_EQ(b[0].bsums[g], sum) << g;
    EXPECT_EQ(b[1].bsums[g], 0);
  }
  EXPECT_EQ(b[1].d, 0.0f);
}

// Super-blocks of 256 whose 32-element sub-blocks are each of a different
// kind: mixed signs, one sign, tiny (subnormal fp16 scales), an outlier,
// constant, zero, large. Then whole super-blocks that are zero or tiny.
std::vector<float> TestRows(std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x;
  for (int sb = 0; sb < 12; ++sb) {
    for (int sub = 0; sub < 8; ++sub) {
      const int kind = sb < 10 ? static_cast<int>(rng() % 8) : 8 + sb - 10;
      for (int j = 0; j < 32; ++j) {
        const float r = u(rng);
        const float v[] = {r,          3.0f + 2.0f * r, -std::fabs(r) * 50.0f, r * 1e-3f,
                           j == 7 ? 100.0f : r * 0.01f, -0.75f, 0.0f, r * 1e4f,
                           0.0f,       r * 1e-6f};
        x.push_back(v[kind]);
      }
    }
  }
  return x;
}

// Largest error QuantizeRow + DequantizeRow may make on element j of a block
// (see the quantisers in ggml_types.cc / ggml_kquants.cc). fp16 scales are
// rounded up by at most a relative 2^-10 or, subnormal, 2^-24.
double ErrorBound(GgmlType type, const float* x, int j, const uint8_t* block) {
  const double up = 1 + 0x1p-10, tiny = 0x1p-24;
  if (type == GgmlType::kQ5_0 || type == GgmlType::kQ5_1) {
    float amax = 0, max = 0, lo = x[0], hi = x[0];
    for (int i = 0; i < 32; ++i) {
      if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), max = x[i];
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    uint16_t d16, m16;
    std::memcpy(&d16, block, 2);
    std::memcpy(&m16, block + 2, 2);
    if (type == GgmlType::kQ5_1) {  // d = range / 31, min stored as fp16
      const double d = (static_cast<double>(hi) - lo) / 31;
      return d / 2 + 31 * std::fabs(d - Fp16ToFp32(d16)) + std::fabs(lo - Fp16ToFp32(m16));
    }
    // d = max / -16; a value of the other sign beyond 15.5 |d| clamps to 31.
    const double d = max / -16.0;
    const bool clamped = d != 0 && x[j] / d > 15.5;
    return (clamped ? std::fabs(d) : std::fabs(d) / 2) + 16 * std::fabs(d - Fp16ToFp32(d16));
  }
  if (type == GgmlType::kQ6_K) {  // step amax / 31 per 16, scale d <= max step / 127
    double a = 0, max_step = 0;
    for (int g = 0; g < 16; ++g) {
      double amax = 0;
      for (int i = 0; i < 16; ++i) amax = std::max<double>(amax, std::fabs(x[16 * g + i]));
      if (g == j / 16) a = amax;
      max_step = std::max(max_step, amax / 31);
    }
    return (a / 31 + max_step / 127 * up + tiny) / 2;
  }
  // Q4_K / Q5_K: offsets min(0, lo) in steps dmin <= max offset / 63, then
  // steps (hi - lo + dmin) / nmax in units d <= max step / 63.
  const double nmax = type == GgmlType::kQ4_K ? 15 : 31;
  double lo[8], hi[8], max_off = 0;
  for (int s = 0; s < 8; ++s) {
    lo[s] = 0;
    hi[s] = x[32 * s];
    for (int i = 0; i < 32; ++i) {
      lo[s] = std::min(lo[s], static_cast<double>(x[32 * s + i]));
      hi[s] = std::max(hi[s], static_cast<double>(x[32 * s + i]));
    }
    max_off = std::max(max_off, -lo[s]);
  }
  const double dmin = max_off / 63 * up + tiny;
  double max_step = 0;
  for (int s = 0; s < 8; ++s) max_step = std::max(max_step, (hi[s] - lo[s] + dmin) / nmax);
  const int s = j / 32;
  return ((hi[s] - lo[s] + dmin) / nmax + max_step / 63 * up + tiny) / 2;
}

TEST(KQuantizeTest, RoundTripErrorBounds) {
  std::mt19937 rng(3);
  for (GgmlType type :
       {GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K}) {
    SCOPED_TRACE(std::string(TypeName(type)));
    const int be = BlockElements(type);
    for (int trial = 0; trial < 10; ++trial) {
      const std::vector<float> x = TestRows(rng);
      const int64_t n = static_cast<int64_t>(x.size());
      std::vector<uint8_t> q(RowBytes(type, n));
      QuantizeRow(type, x.data(), q.data(), n);
      const std::vector<float> y = Decode(type, q.data(), n);
      double worst = 0;  // the largest error as a share of its bound
      for (int64_t b = 0; b < n / be; ++b) {
        const float* xb = &x[b * be];
        float mag = 0;
        for (int i = 0; i < be; ++i) mag = std::max(mag, std::fabs(xb[i]));
        const double slack = 64 * FLT_EPSILON * mag;
        for (int i = 0; i < be; ++i) {
          const double err = std::fabs(static_cast<double>(xb[i]) - y[b * be + i]);
          const double bound = ErrorBound(type, xb, i, q.data() + b * BlockBytes(type));
          ASSERT_LE(err, bound + slack) << "block " << b << " element " << i << ": " << xb[i]
                                        << " -> " << y[b * be + i];
          if (bound > 0) worst = std::max(worst, err / bound);
          if (mag == 0) {
            ASSERT_EQ(y[b * be + i], 0.0f);
          }
        }
      }
      EXPECT_GT(worst, 0.2);  // the bounds are not vacuous
    }
  }
}

}  // namespace
}  // namespace psa
