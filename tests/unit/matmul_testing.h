// Test support: MatMul over a row range checked against DotRow, one weight
// row and token at a time, with every output outside the range untouched.
#ifndef PSA_TESTS_UNIT_MATMUL_TESTING_H_
#define PSA_TESTS_UNIT_MATMUL_TESTING_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "compute_worker/kernels/matmul.h"
#include "gtest/gtest.h"

namespace psa::testing {

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
