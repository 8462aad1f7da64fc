// Dot kernels for Q5_0 / Q5_1 weights (against Q8_0 / Q8_1 activations) and
// the K-quants Q4_K, Q5_K, Q6_K (against Q8_K), in the style of matmul.cc:
// one weight row against N activation rows, each weight block unpacked once
// and reused for every row. MatMul and DotRow (matmul.h) dispatch to them;
// call those. AVX2 (VNNI where the build has it) or, without AVX2, the
// scalar kernels below. Stateless; safe from any thread.
#ifndef PSA_COMPUTE_WORKER_KERNELS_KQUANT_DOT_H_
#define PSA_COMPUTE_WORKER_KERNELS_KQUANT_DOT_H_

#include <cstdint>

#include "compute_worker/model/ggml_types.h"

namespace psa {

// out[t] = dot(w_row, x_rows[t]) for t < N over nb blocks (of 32 elements
// for Q5_*, of 256 for the K-quants). Instantiated for N = 1 and N = 4.
template <int N>
void DotQ5_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out);
template <int N>
void DotQ5_1xQ8_1(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out);
template <int N>
void DotQ4_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out);
template <int N>
void DotQ5_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out);
template <int N>
void DotQ6_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out);

// The portable scalar kernel for one row of weight_type (Q5_0, Q5_1, Q4_K,
// Q5_K or Q6_K; 0 for others) against one row of its activation type. It is
// the fallback without AVX2, and always built so tests can hold the SIMD
// kernels to it.
float ScalarKQuantDot(GgmlType weight_type, const uint8_t* w_row, const uint8_t* x_row,
                      int64_t cols);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KERNELS_KQUANT_DOT_H_
