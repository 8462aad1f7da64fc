// Tile GEMM for Q4_K / Q6_K weights against Q8_K activations, Q5_0 / Q8_0
// weights against Q8_0 and Q4_1 against Q8_1 activations, for prefill.
//
// The per-row kernels (kquant_dot.h) spend two instructions (maddubs, then a
// scale multiply-add) per 32 products and reload every activation for each
// weight row. Here 16 weight rows are unpacked, one super-block at a time,
// into 4-code groups interleaved across the rows (lane r of a 512-bit vector
// is row r), so one VNNI vpdpbusd with a broadcast group of 4 activation
// bytes does 64 products for 16 rows; a sub-block's scales are applied once
// per 32 (Q4_K and the 32-element types) or 16 (Q6_K) elements. The
// unpacking is shared by a block of tokens. Built where the compiler targets
// AVX-512 VNNI (-march=native on such a CPU: PSA_TILE_GEMM); elsewhere
// TileGemmSupports is false and MatMul keeps the per-row kernels.
//
// Results equal the per-row kernels bit for bit: the integer sums are exact
// in both, and where the tile is built the row kernels finish every block
// with the tile's float step (quant_simd.h, TileStep*), one lane of it. So a
// token's result does not depend on how many tokens share its MatMul.
#ifndef PSA_COMPUTE_WORKER_KERNELS_KQUANT_GEMM_H_
#define PSA_COMPUTE_WORKER_KERNELS_KQUANT_GEMM_H_

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define PSA_TILE_GEMM 1
#endif

#include <cstddef>
#include <cstdint>
#include <vector>

#include "compute_worker/model/ggml_types.h"

namespace psa {

// Rows per tile: TileGemm16 computes this many consecutive weight rows.
constexpr int kTileRows = 16;

// Whether this build has a tile kernel for weights of `type`.
bool TileGemmSupports(GgmlType type);

// What the Q5_0 / Q8_0 / Q4_1 tiles need of the Q8_0 / Q8_1 activations
// besides their codes, computed once per MatMul rather than once per tile:
// each block's scale as a float and the sum of its codes (Q8_0) or Q8_1's
// s as a float (row t, block b at t * nb + b).
struct TileActivations {
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> s;
};

// Fills `out` for weights of type `weight` (nothing for the K-quants, whose
// Q8_K activations carry float scales and sums already).
void PrepareTileActivations(GgmlType weight, const uint8_t* x, size_t x_row_bytes, int n,
                            int64_t cols, TileActivations* out);

// y[t * ldy + r] = dot(weight row r, activation row t) for the kTileRows rows
// starting at w (consecutive rows w_row_bytes apart) and tokens t < n (Q8_K
// rows x_row_bytes apart from x: Q8_K for the K-quants, Q8_0 for Q5_0 and
// Q8_0, Q8_1 for Q4_1). cols is a multiple of the weight type's block; `side` is what
// PrepareTileActivations made of x. Single-threaded; MatMul splits tiles
// across threads.
void TileGemm16(GgmlType type, const uint8_t* w, size_t w_row_bytes, const uint8_t* x,
                size_t x_row_bytes, int n, int64_t cols, const TileActivations& side, float* y,
                int64_t ldy);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KERNELS_KQUANT_GEMM_H_
