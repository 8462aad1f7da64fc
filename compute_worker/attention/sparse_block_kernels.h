// The sparse engine's block kernels: scores and value accumulation over one
// full 16-row block at head dim 64 or 128 (AVX-512), for every active head
// of a GQA group at once. kBlockKernels is false where they are not compiled;
// callers then take their scalar path. Stateless; thread-safe.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_SPARSE_BLOCK_KERNELS_H_
#define PSA_COMPUTE_WORKER_ATTENTION_SPARSE_BLOCK_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "compute_worker/attention/head_state.h"
#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/model/llama_model.h"  // kMaxGqaGroup

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace psa {

#if defined(__AVX512F__)
// The 16 rows of a full block, head dim 64, for the group's active heads:
// s[g * stride + t] = scale * q_g . k_t.
template <int kGroup>
void BlockScores16x64(const uint16_t* k, const float* const* qs, float scale, float* s, int stride) {
  __m512 dots[kGroup];
  Dot16RowsFp16x64<kGroup>(qs, k, dots);
  for (int g = 0; g < kGroup; ++g) {
    _mm512_storeu_ps(s + static_cast<size_t>(g) * stride, _mm512_mul_ps(dots[g], _mm512_set1_ps(scale)));
  }
}

// Usually every head of the group is active (a stopped head attends on
// with share_reads): the block kernels then convert each row once, in
// registers, for all of them.
inline bool AllActive(const HeadState* heads, int group) {
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) return false;
  }
  return true;
}

inline void BlockScores16x64(const uint16_t* k, const float* const* qs, const HeadState* heads,
                      int group, float scale, float* s, int stride) {
  if (AllActive(heads, group) && WithGroup(group, [&](auto g) {
        BlockScores16x64<decltype(g)::value>(k, qs, scale, s, stride);
      })) {
    return;
  }
  alignas(64) float kf[16 * 64];
  Fp16RowToFp32(k, kf, 16 * 64);
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) continue;
    _mm512_storeu_ps(s + static_cast<size_t>(g) * stride,
                     _mm512_mul_ps(Dot16Rows64(qs[g], kf), _mm512_set1_ps(scale)));
  }
}

// acc_g += sum_t p[g * stride + t] * v_t over the 16 rows of a full block,
// head dim 64, for the group's active heads.
template <int kGroup>
void BlockValues16x64(const uint16_t* v, const float* p, int stride, HeadState* heads) {
  __m512 a[kGroup][4];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < 4; ++j) a[g][j] = _mm512_loadu_ps(heads[g].acc.data() + 16 * j);
  for (int t = 0; t < 16; ++t, v += 64) {
    __m512 vv[4];
    Fp16Row64(v, vv);
    AccumulateRow64<kGroup>(p + t, stride, vv, a);
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(heads[g].acc.data() + 16 * j, a[g][j]);
}

inline void BlockValues16x64(const uint16_t* v, const float* p, int stride, HeadState* heads,
                      int group) {
  if (AllActive(heads, group) && WithGroup(group, [&](auto g) {
        BlockValues16x64<decltype(g)::value>(v, p, stride, heads);
      })) {
    return;
  }
  alignas(64) float vf[16 * 64];
  Fp16RowToFp32(v, vf, 16 * 64);
  for (int g = 0; g < group; ++g) {
    HeadState& h = heads[g];
    if (!h.active) continue;
    __m512 a[4];
    for (int j = 0; j < 4; ++j) a[j] = _mm512_loadu_ps(h.acc.data() + 16 * j);
    for (int t = 0; t < 16; ++t) {
      const __m512 pt = _mm512_set1_ps(p[static_cast<size_t>(g) * stride + t]);
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(pt, _mm512_load_ps(vf + t * 64 + 16 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(h.acc.data() + 16 * j, a[j]);
  }
}

// Head dim 128: the 16 rows converted once, then every active head's scores
// (DotF32x16: bit-equal to DotF32 per row, with no reduction per row) and
// value sums (AccumulateHeads: the same fused adds as AxpyF32 per row, with
// the sums held in registers).
inline void BlockScores16x128(const uint16_t* k, const float* const* qs, const HeadState* heads,
                              int group, float scale, float* s, int stride) {
  alignas(64) float kf[16 * 128];
  Fp16RowToFp32(k, kf, 16 * 128);
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) continue;
    __m512 q[8];
    for (int c = 0; c < 8; ++c) q[c] = _mm512_loadu_ps(qs[g] + 16 * c);
    _mm512_storeu_ps(s + static_cast<size_t>(g) * stride,
                     _mm512_mul_ps(DotF32x16<128>(q, kf), _mm512_set1_ps(scale)));
  }
}

inline void BlockValues16x128(const uint16_t* v, const float* p, int stride, HeadState* heads,
                              int group) {
  alignas(64) float vf[16 * 128];
  Fp16RowToFp32(v, vf, 16 * 128);
  const float* pp[kMaxGqaGroup];
  float* op[kMaxGqaGroup];
  int n = 0;
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) continue;
    pp[n] = p + static_cast<size_t>(g) * stride;
    op[n++] = heads[g].acc.data();
  }
  AccumulateHeads<128>(vf, 16, pp, op, n);
}
constexpr bool kBlockKernels = true;
#else
constexpr bool kBlockKernels = false;  // the stubs below are never called
inline void BlockScores16x64(const uint16_t*, const float* const*, const HeadState*, int, float, float*,
                      int) {}
inline void BlockValues16x64(const uint16_t*, const float*, int, HeadState*, int) {}
inline void BlockScores16x128(const uint16_t*, const float* const*, const HeadState*, int, float,
                              float*, int) {}
inline void BlockValues16x128(const uint16_t*, const float*, int, HeadState*, int) {}
#endif

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_SPARSE_BLOCK_KERNELS_H_
