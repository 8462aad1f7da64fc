// Weight x activation products for quantised weights, the runtime's hot loop.
//
// Activations are first packed into the weight type's dot-product partner
// (as ggml does): Q4_1 and Q5_1 weights pair with Q8_1 activations, Q4_0,
// Q5_0 and Q8_0 with Q8_0, the K-quants (Q4_K, Q5_K, Q6_K) with Q8_K, float
// weights with F32. The integer kernels then use AVX-512 VNNI / AVX-VNNI /
// AVX2 (chosen at build time) and rows are split across threads. The Q5 and
// K-quant kernels are in kquant_dot.h; prefill-sized batches of the common
// types go through the AVX-512 VNNI tile GEMM of kquant_gemm.h where built.
#ifndef PSA_COMPUTE_WORKER_KERNELS_MATMUL_H_
#define PSA_COMPUTE_WORKER_KERNELS_MATMUL_H_

#include <cstdint>
#include <vector>

#include "compute_worker/model/llama_model.h"

namespace psa {

struct PackedActivations {
  GgmlType type = GgmlType::kF32;
  int n = 0;            // rows (tokens)
  int64_t cols = 0;
  size_t row_bytes = 0;
  std::vector<uint8_t> data;
  const uint8_t* row(int i) const { return data.data() + i * row_bytes; }
};

// The activation type that pairs with weights of type `weight`.
GgmlType ActivationTypeFor(GgmlType weight);

// Packs n rows of `cols` floats (row stride `ld`) for weights of `weight` type.
void PackActivations(GgmlType weight, const float* x, int n, int64_t cols, int64_t ld,
                     PackedActivations* out);

// y[t * ldy + r] = dot(w.row(r), x.row(t)) for rows r in [row_begin, row_end)
// and all tokens t. Threads split the rows.
void MatMul(const WeightMatrix& w, const PackedActivations& x, float* y, int64_t ldy,
            int64_t row_begin = 0, int64_t row_end = -1);

// Single dot product of one weight row and one packed activation row
// (exposed for tests against a float reference).
float DotRow(GgmlType weight_type, const uint8_t* w_row, const uint8_t* x_row, int64_t cols);

// The AVX-512 tile GEMM for batches of 16 rows or more (kquant_gemm.h), on
// by default where built. Its results equal the per-row kernels' bit for bit
// (they end each block with its float step), so a token's result does not
// depend on how many rows share its pass (a decode step batched with a
// prompt chunk, a prompt tail resumed after a failover). Off measures the
// per-row kernels alone. Process-wide; thread-safe.
void SetTileGemmEnabled(bool on);
bool TileGemmEnabled();

// Name of the SIMD path compiled in ("avx512-vnni", "avx-vnni", "avx2", "scalar").
const char* MatMulIsa();

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KERNELS_MATMUL_H_
