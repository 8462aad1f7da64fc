// Test support for the weight-type and matmul tests: random values, rows
// quantised with QuantizeRow, a WeightMatrix over them, and MatMul over a row
// range checked against DotRow with every output outside the range untouched.
#ifndef PSA_TESTS_UNIT_MATMUL_TESTING_H_
#define PSA_TESTS_UNIT_MATMUL_TESTING_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "compute_worker/kernels/matmul.h"
#include "gtest/gtest.h"

namespace psa::testing {

// n values uniform in [-scale, scale), plus shift.
inline std::vector<float> RandomValues(std::mt19937& rng, int64_t n, float scale,
                                       float shift = 0) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng) + shift;
  return v;
}

// rows x cols floats as `type`, row after row.
inline std::vector<uint8_t> Quantize(GgmlType type, const std::vector<float>& x, int64_t rows,
                                     int64_t cols) {
  std::vector<uint8_t> out(RowBytes(type, cols) * rows);
  for (int64_t r = 0; r < rows; ++r) {
    QuantizeRow(type, x.data() + r * cols, out.data() + r * RowBytes(type, cols), cols);
  }
  return out;
}

// A rows x cols matrix of `type` over `data` (which must outlive it).
inline WeightMatrix MakeWeightMatrix(GgmlType type, const std::vector<uint8_t>& data,
                                     int64_t rows, int64_t cols) {
  WeightMatrix w;
  w.type = type;
  w.data = data.data();
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = RowBytes(type, cols);
  return w;
}

// MatMul(w, x) for weight rows [begin, end) (end -1: all) into an n x ldy
// output prefilled with a sentinel; each result within `tolerance` *
// (8 + |DotRow|) of DotRow (0: bit-equal), the rest still the sentinel.
inline void ExpectMatMulEqualsDotRow(const WeightMatrix& w, const PackedActivations& x,
                                     int64_t ldy, int64_t begin, int64_t end,
                                     float tolerance = 0.0f) {
  constexpr float kUntouched = -12345.0f;
  SCOPED_TRACE(std::string(TypeName(w.type)) + " n=" + std::to_string(x.n) + " rows [" +
               std::to_string(begin) + ", " + std::to_string(end) + ")");
  std::vector<float> y(static_cast<size_t>(x.n) * ldy, kUntouched);
  MatMul(w, x, y.data(), ldy, begin, end);
  const int64_t stop = end < 0 ? w.rows : end;
  for (int t = 0; t < x.n; ++t) {
    for (int64_t r = 0; r < ldy; ++r) {
      const float got = y[t * ldy + r];
      if (r >= begin && r < stop) {
        const float want = DotRow(w.type, w.row(r), x.row(t), w.cols);
        if (tolerance == 0.0f) {
          ASSERT_EQ(got, want) << "token " << t << " row " << r;
        } else {
          ASSERT_NEAR(got, want, tolerance * (8 + std::fabs(want)))
              << "token " << t << " row " << r;
        }
      } else {
        ASSERT_EQ(got, kUntouched) << "token " << t << " row " << r;
      }
    }
  }
}

}  // namespace psa::testing

#endif  // PSA_TESTS_UNIT_MATMUL_TESTING_H_
