// Integer SIMD helpers shared by the quantised dot kernels (matmul.cc,
// kquant_dot.cc): u8 x s8 dot products (VNNI where the build has it),
// nibble and bit unpacking, horizontal sums, and where the tile GEMM is
// built the float accumulation in its arithmetic (TileBlockRow,
// TileSuperBlockSums). AVX2 builds only; stateless.
#ifndef PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_
#define PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_

#if defined(__AVX2__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "compute_worker/kernels/kquant_gemm.h"  // PSA_TILE_GEMM
#include "compute_worker/kernels/simd_warnings.h"
#include "compute_worker/model/ggml_types.h"

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa::simd {

// Sum of products of 32 unsigned bytes with 32 signed bytes, as 8 int32 lanes.
inline __m256i DotU8S8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// |a|.sign(b, a) turns a signed x signed product into unsigned x signed.
inline __m256i DotS8S8(__m256i a, __m256i b) {
  return DotU8S8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

// acc + the pairwise int16 products a * b summed into 8 int32 lanes.
inline __m256i MaddAcc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// 16 bytes of nibbles -> 32 bytes 0..15: low nibbles (elements 0..15), then high.
inline __m256i UnpackNibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Byte j is 0xFF where bit j of `bits` is set, 0 where it is clear.
inline __m256i BitsToBytes(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_movm_epi8(bits);
#else
  // Byte j takes byte j/8 of bits, then all but bit j%8 are set: it is all
  // ones exactly when that bit was.
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
  return _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
#endif
}

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 Fp16Pair(uint16_t a, uint16_t b) {
  return _mm256_set1_ps(Fp16ToFp32(a) * Fp16ToFp32(b));
}

#if defined(PSA_TILE_GEMM)
// Where the tile GEMM is built (kquant_gemm.h), the row kernels accumulate
// in its float arithmetic, one lane of it, instead of in 8 lanes of partial
// products, so both kernels give a token the same bits whatever its batch.
// Each block's integer products arrive unsummed (8 lanes); one hadd tree
// sums four such vectors. Explicit intrinsics: every product is rounded, or
// fused, as the tile's.

// Lane i = the sum of the 8 lanes of the i-th argument (exact).
inline __m128i Reduce4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_hadd_epi32(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256i cd = _mm256_hadd_epi32(c, d);
  const __m256i abcd = _mm256_hadd_epi32(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 ...
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// 32-element blocks: per token, four partial sums, block b's
//   s_b * (dw_b * dx_b)  [+ mw_b * xs_b for Q4_1]
// fused into partial b % 4, in block order; the total (p0 + p1) + (p2 + p3).
// A row kernel in that arithmetic: codes(b) is weight block b unpacked,
// dot(codes, t, b) its products with token t (8 lanes), dw(b) / dx(t, b)
// the scales, and for Q4_1 mw(b) / xs(t, b). Four blocks at a time: one
// hadd tree per token sums their products, one fma adds them to the four
// partials (blocks past the row's end add zero).
template <int N, bool kMin, typename Codes, typename Dot, typename Dw, typename Dx,
          typename Mw = std::nullptr_t, typename Xs = std::nullptr_t>
void TileBlockRow(int nb, Codes codes, Dot dot, Dw dw, Dx dx, float* out, Mw mw = nullptr,
                  Xs xs = nullptr) {
  __m128 acc[N];
  for (__m128& a : acc) a = _mm_setzero_ps();
  auto quad = [&](int b0, auto full) {
    constexpr bool kFull = decltype(full)::value;
    auto has = [&](int g) { return kFull || b0 + g < nb; };
    __m256i q[4];
    float w[4], m[4] = {};
    for (int g = 0; g < 4; ++g) {
      q[g] = has(g) ? codes(b0 + g) : _mm256_setzero_si256();
      w[g] = has(g) ? dw(b0 + g) : 0.0f;
      if constexpr (kMin) m[g] = has(g) ? mw(b0 + g) : 0.0f;
    }
    const __m128 wv = _mm_setr_ps(w[0], w[1], w[2], w[3]);
    for (int t = 0; t < N; ++t) {
      __m256i p[4];
      float x[4], s[4] = {};
      for (int g = 0; g < 4; ++g) {
        p[g] = has(g) ? dot(q[g], t, b0 + g) : _mm256_setzero_si256();
        x[g] = has(g) ? dx(t, b0 + g) : 0.0f;
        if constexpr (kMin) s[g] = has(g) ? xs(t, b0 + g) : 0.0f;
      }
      const __m128 wx = _mm_mul_ps(wv, _mm_setr_ps(x[0], x[1], x[2], x[3]));
      acc[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(Reduce4(p[0], p[1], p[2], p[3])), wx, acc[t]);
      if constexpr (kMin) {
        acc[t] = _mm_fmadd_ps(_mm_setr_ps(m[0], m[1], m[2], m[3]),
                              _mm_setr_ps(s[0], s[1], s[2], s[3]), acc[t]);
      }
    }
  };
  int b0 = 0;
  for (; b0 + 4 <= nb; b0 += 4) quad(b0, std::true_type());
  if (b0 < nb) quad(b0, std::false_type());
  for (int t = 0; t < N; ++t) {
    const __m128 pairs = _mm_add_ps(acc[t], _mm_movehdup_ps(acc[t]));  // p0+p1, _, p2+p3, _
    out[t] = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehl_ps(pairs, pairs)));
  }
}

// K-quant super-blocks: per token, in block order,
//   sum += dx * (d * isum - dcorr * icorr).
// Four tokens go in the lanes of one vector; one token in lane 0.
template <int N>
class TileSuperBlockSums {
  static_assert(N == 1 || N == 4);

 public:
  void Add(const __m256i* isum, const __m256i* icorr, float d, float dcorr, const float* dx) {
    __m128i is, ic;
    __m128 x;
    if constexpr (N == 4) {
      is = Reduce4(isum[0], isum[1], isum[2], isum[3]);
      ic = Reduce4(icorr[0], icorr[1], icorr[2], icorr[3]);
      x = _mm_loadu_ps(dx);
    } else {
      const __m256i h = _mm256_hadd_epi32(isum[0], icorr[0]);  // i01 i23 c01 c23 | ...
      __m128i both = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      both = _mm_hadd_epi32(both, both);  // i, c, i, c
      is = both;
      ic = _mm_shuffle_epi32(both, 0x55);
      x = _mm_set_ss(dx[0]);
    }
    const __m128 corr = _mm_mul_ps(_mm_set1_ps(dcorr), _mm_cvtepi32_ps(ic));
    const __m128 v = _mm_fmsub_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(is), corr);
    acc_ = _mm_fmadd_ps(x, v, acc_);
  }
  void Finish(float* out) const {
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, acc_);
    for (int t = 0; t < N; ++t) out[t] = lanes[t];
  }

 private:
  __m128 acc_ = _mm_setzero_ps();
};
#endif

}  // namespace psa::simd

PSA_END_AVX512_CODE

#endif  // __AVX2__

#endif  // PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_
