// The Q5_0 / Q5_1 / K-quant dot kernels against a float reference computed
// from DequantizeRow, the SIMD kernels against the scalar ones, MatMul's
// batching, and tiny models with these weights against a reference forward.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "compute_worker/kernels/kquant_dot.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"
#include "tests/unit/matmul_testing.h"
#include "tests/unit/reference_forward.h"

namespace psa {
namespace {

constexpr GgmlType kNewTypes[] = {GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ4_K,
                                  GgmlType::kQ5_K, GgmlType::kQ6_K};

// The constant a block subtracts from (or adds to) element i: Q5_1's m, the
// K-quants' dmin * m_j. Kernels fold it in separately, so its size, not only
// the element's, bounds their float rounding.
double Offset(GgmlType type, const uint8_t* w_row, int64_t i) {
  if (type == GgmlType::kQ5_1) {
    return Fp16ToFp32(reinterpret_cast<const BlockQ5_1*>(w_row)[i / kQK].m);
  }
  if (type == GgmlType::kQ4_K || type == GgmlType::kQ5_K) {  // same d, dmin, scales prefix
    const uint8_t* block = w_row + (i / kQK_K) * BlockBytes(type);
    const auto* b = reinterpret_cast<const BlockQ4_K*>(block);
    uint8_t sc[8], m[8];
    DecodeQ4KScales(b->scales, sc, m);
    return static_cast<double>(Fp16ToFp32(b->dmin)) * m[(i % kQK_K) / 32];
  }
  return 0;
}

struct Reference {
  double value = 0;
  double tolerance = 0;
};

// Double-precision dot of the dequantised weight row and activation row:
// the kernels sum the same integers exactly, so only float rounding, a
// relative 1e-5 of the magnitudes involved, separates them. Q5_1 also reads
// the activation block's stored s = fp16(d * sum(q)) in place of
// d16 * sum(q): that gap is added, as for Q4_1 in ggml_types_test.
Reference DequantisedDot(GgmlType type, const uint8_t* w_row, const uint8_t* x_row,
                         int64_t cols) {
  std::vector<float> wf(cols), xf(cols);
  DequantizeRow(type, w_row, wf.data(), cols);
  DequantizeRow(ActivationTypeFor(type), x_row, xf.data(), cols);
  Reference ref;
  double magnitude = 0;
  for (int64_t i = 0; i < cols; ++i) {
    ref.value += static_cast<double>(wf[i]) * xf[i];
    magnitude += (std::fabs(wf[i]) + std::fabs(Offset(type, w_row, i))) * std::fabs(xf[i]);
  }
  ref.tolerance = 1e-5 * magnitude + 1e-6;
  if (type == GgmlType::kQ5_1) {
    const auto* wb = reinterpret_cast<const BlockQ5_1*>(w_row);
    const auto* xb = reinterpret_cast<const BlockQ8_1*>(x_row);
    for (int64_t b = 0; b < cols / kQK; ++b) {
      int sum = 0;
      for (int j = 0; j < kQK; ++j) sum += xb[b].qs[j];
      ref.tolerance += std::fabs(Fp16ToFp32(wb[b].m)) *
                       std::fabs(Fp16ToFp32(xb[b].s) - Fp16ToFp32(xb[b].d) * sum);
    }
  }
  return ref;
}

std::vector<int64_t> Widths(GgmlType type) {
  if (BlockElements(type) == kQK) return {32, 96, 896, 4864};
  return {256, 768, 4864};
}

TEST(KQuantDotTest, ActivationTypes) {
  EXPECT_EQ(ActivationTypeFor(GgmlType::kQ5_0), GgmlType::kQ8_0);
  EXPECT_EQ(ActivationTypeFor(GgmlType::kQ5_1), GgmlType::kQ8_1);
  for (GgmlType t : {GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K}) {
    EXPECT_EQ(ActivationTypeFor(t), GgmlType::kQ8_K);
  }
}

// Quantised random weights (some rows shifted, so minimums matter) against
// the reference, through DotRow (the SIMD kernels on SIMD builds) and the
// scalar kernels.
TEST(KQuantDotTest, MatchesDequantisedReference) {
  std::mt19937 rng(9);
  for (GgmlType type : kNewTypes) {
    for (int64_t cols : Widths(type)) {
      for (float shift : {0.0f, 0.7f}) {
        SCOPED_TRACE(std::string(TypeName(type)) + " x " + std::to_string(cols) + " shift " +
                     std::to_string(shift));
        const std::vector<uint8_t> w =
            testing::Quantize(type, testing::RandomValues(rng, cols, 1.0f, shift), 1, cols);
        const std::vector<float> x = testing::RandomValues(rng, cols, 2.0f);
        PackedActivations packed;
        PackActivations(type, x.data(), 1, cols, cols, &packed);
        ASSERT_EQ(packed.type, ActivationTypeFor(type));
        const Reference ref = DequantisedDot(type, w.data(), packed.row(0), cols);
        EXPECT_NEAR(DotRow(type, w.data(), packed.row(0), cols), ref.value, ref.tolerance);
        EXPECT_NEAR(ScalarKQuantDot(type, w.data(), packed.row(0), cols), ref.value,
                    ref.tolerance);
      }
    }
  }
}

// Random bytes as weight blocks reach every code, every scale (Q6_K's -128
// included) and every bit of the layouts; only the fp16 scales are set to
// finite values. Activations at full scale (codes +-127) test for int16
// overflow in the SIMD kernels.
TEST(KQuantDotTest, RandomBlocksAgreeWithScalarAndReference) {
  std::mt19937 rng(21);
  for (GgmlType type : kNewTypes) {
    const int64_t cols = BlockElements(type) == kQK ? 640 : 1280;
    const size_t bytes = RowBytes(type, cols);
    for (int trial = 0; trial < 6; ++trial) {
      SCOPED_TRACE(std::string(TypeName(type)) + " trial " + std::to_string(trial));
      std::vector<uint8_t> w(bytes);
      for (uint8_t& v : w) v = static_cast<uint8_t>(rng());
      std::uniform_real_distribution<float> scale(-0.05f, 0.05f);
      for (size_t b = 0; b < bytes; b += BlockBytes(type)) {
        const uint16_t d = Fp32ToFp16(scale(rng)), second = Fp32ToFp16(scale(rng));
        if (type == GgmlType::kQ6_K) {
          std::memcpy(&w[b + offsetof(BlockQ6_K, d)], &d, 2);
        } else {  // d first; then m (Q5_1) or dmin (Q4_K, Q5_K)
          std::memcpy(&w[b], &d, 2);
          if (type != GgmlType::kQ5_0) std::memcpy(&w[b + 2], &second, 2);
        }
      }
      std::vector<float> x = testing::RandomValues(rng, cols, 3.0f);
      if (trial == 1) std::fill(x.begin(), x.end(), 1.0f);   // every code +-127
      if (trial == 2) std::fill(x.begin(), x.end(), -1.0f);
      PackedActivations packed;
      PackActivations(type, x.data(), 1, cols, cols, &packed);
      const Reference ref = DequantisedDot(type, w.data(), packed.row(0), cols);
      const float simd = DotRow(type, w.data(), packed.row(0), cols);
      const float scalar = ScalarKQuantDot(type, w.data(), packed.row(0), cols);
      EXPECT_NEAR(simd, ref.value, ref.tolerance);
      EXPECT_NEAR(scalar, ref.value, ref.tolerance);
      EXPECT_NEAR(simd, scalar, ref.tolerance);
    }
  }
}

// MatMul over token batches of every size the kernels special-case (groups
// of 4 plus a tail) and row ranges, against DotRow per element: exactly
// equal, and nothing outside the range written.
TEST(KQuantDotTest, MatMulEqualsDotRowPerElement) {
  constexpr int64_t kRows = 40, kCols = 512, kLdx = kCols + 5, kLdy = kRows + 3;
  std::mt19937 rng(13);
  for (GgmlType type : kNewTypes) {
    const std::vector<uint8_t> data =
        testing::Quantize(type, testing::RandomValues(rng, kRows * kCols, 1.0f, 0.2f), kRows,
                          kCols);
    const WeightMatrix w = testing::MakeWeightMatrix(type, data, kRows, kCols);
    for (int n : {1, 3, 4, 5, 8, 9}) {
      const std::vector<float> x = testing::RandomValues(rng, n * kLdx, 1.0f);
      PackedActivations packed;
      PackActivations(type, x.data(), n, kCols, kLdx, &packed);
      for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, -1}, {3, 37}, {39, 40}, {5, 5}}) {
        testing::ExpectMatMulEqualsDotRow(w, packed, kLdy, begin, end);
      }
    }
  }
}

// Prefill-sized batches go through the tile GEMM (kquant_gemm.h) for whole
// 16-row tiles where the build has it: bit-equal to DotRow, the one-token
// path (the row kernels end each block with the tile's float step), so a
// token's result does not depend on its batch. Token counts that leave a
// tail of the 4-token groups and of the 128-token blocks, row ranges that
// leave rows after the last tile, and nothing outside the range written.
// (Checked to fail with the row kernels' lane-wise float sums.)
TEST(KQuantDotTest, PrefillBatchesEqualDotRowBitForBit) {
  constexpr int64_t kRows = 40, kCols = 768, kLdx = kCols + 3, kLdy = kRows + 5;
  std::mt19937 rng(17);
  for (GgmlType type : {GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ4_K, GgmlType::kQ5_K,
                        GgmlType::kQ6_K, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1}) {
    const std::vector<uint8_t> data =
        testing::Quantize(type, testing::RandomValues(rng, kRows * kCols, 1.0f, 0.2f), kRows,
                          kCols);
    const WeightMatrix w = testing::MakeWeightMatrix(type, data, kRows, kCols);
    for (int n : {16, 19, 64, 133}) {
      const std::vector<float> x = testing::RandomValues(rng, n * kLdx, 1.0f, -0.1f);
      PackedActivations packed;
      PackActivations(type, x.data(), n, kCols, kLdx, &packed);
      for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, -1}, {3, 37}, {8, 24}}) {
        testing::ExpectMatMulEqualsDotRow(w, packed, kLdy, begin, end);
      }
    }
  }
}

// Whole tiny models (256 wide: a K-quant row is one super-block) against
// the double-precision reference on the same dequantised weights; the
// embeddings are K-quants too in some, and read through DequantizeRow.
TEST(KQuantRuntimeTest, TinyModelsStayCloseToReference) {
  struct Case {
    GgmlType weights, embd;
    bool tied;
  };
  const Case cases[] = {
      {GgmlType::kQ5_0, GgmlType::kQ8_0, false}, {GgmlType::kQ5_1, GgmlType::kQ5_0, true},
      {GgmlType::kQ4_K, GgmlType::kQ6_K, false}, {GgmlType::kQ5_K, GgmlType::kQ4_K, true},
      {GgmlType::kQ6_K, GgmlType::kQ5_K, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(TypeName(c.weights)) + " / " + std::string(TypeName(c.embd)));
    testing::TinyModelSpec spec;
    spec.n_layer = 2;
    spec.n_embd = 256;
    spec.n_head = 4;
    spec.n_head_kv = 2;
    spec.n_ff = 512;
    spec.weight_type = c.weights;
    spec.embd_type = c.embd;
    spec.tied_output = c.tied;
    spec.seed = 40 + static_cast<int>(c.weights);
    auto model = TinyModel(spec);
    ASSERT_NE(model, nullptr);
    const ReferenceComparison r =
        CompareWithReference(*model, RandomTokens(12, model->hparams().n_vocab, 5));
    ASSERT_TRUE(r.ok);
    double num = 0, den = 0;
    for (size_t i = 0; i < r.want.size(); ++i) {
      num += (r.got[i] - r.want[i]) * (r.got[i] - r.want[i]);
      den += r.want[i] * r.want[i];
    }
    // Activation quantisation (Q8_0 / Q8_1 / Q8_K) is the only approximation
    // beyond fp16; a misread layout would be off by 100%. Q8_K has one scale
    // per 256 values, so its rounding is coarser (measured: about 0.018 for
    // the Q5 types, 0.025 for the K-quants).
    const bool k_quant = BlockElements(c.weights) == kQK_K;
    EXPECT_LT(std::sqrt(num / den), k_quant ? 0.05 : 0.03);
  }
}

}  // namespace
}  // namespace psa
