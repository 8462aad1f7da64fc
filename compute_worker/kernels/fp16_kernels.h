// Small inline kernels over fp16 KV rows shared by the attention backends:
// row conversion, dot products, axpy and the softmax passes (max, exp-sum,
// normalise-and-round). F16C/AVX2/AVX-512 when the build has them.
#ifndef PSA_COMPUTE_WORKER_KERNELS_FP16_KERNELS_H_
#define PSA_COMPUTE_WORKER_KERNELS_FP16_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "compute_worker/kernels/simd_warnings.h"
#include "compute_worker/model/ggml_types.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa {

// Asks for [p, p + bytes) into the caches: kLocality 3 (T0) into L1, for
// what is read next; 2 (T1) into L2, for what is read further ahead.
// Always inlined, and so must be any lambda around it: GCC counts a call to
// a function that only prefetches as free of effects and deletes it.
template <int kLocality>
__attribute__((always_inline)) inline void PrefetchBytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, kLocality);
}

// Runs fn(std::integral_constant<int, G>{}) for a run-time GQA group size
// G of 1-4, so that kernels can keep every head's accumulators in
// registers (G a template argument); false, doing nothing, for others.
template <typename Fn>
bool WithGroup(int group, Fn&& fn) {
  switch (group) {
    case 1: fn(std::integral_constant<int, 1>{}); return true;
    case 2: fn(std::integral_constant<int, 2>{}); return true;
    case 3: fn(std::integral_constant<int, 3>{}); return true;
    case 4: fn(std::integral_constant<int, 4>{}); return true;
    default: return false;
  }
}

// dst[0..n) = fp16 src[0..n) as fp32.
__attribute__((always_inline)) inline void Fp16RowToFp32(const uint16_t* src, float* dst, int n) {
  int i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i,
                     _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#endif
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

__attribute__((always_inline)) inline float DotF32(const float* a, const float* b, int n) {
  int i = 0;
  float s = 0;
#if defined(__AVX512F__)
  // One vector accumulator and a single reduction: the generic reduction
  // below spills to the stack and adds lane by lane.
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  }
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  s = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
__attribute__((always_inline)) inline void AxpyF32(float a, const float* x, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void ScaleF32(float a, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] *= a;
}

inline float RoundToFp16(float x) { return Fp16ToFp32(Fp32ToFp16(x)); }

// exp(x) for x <= 0 within ~2 ulp, written so that loops over it vectorise
// (libm's expf does not without -ffast-math): exp(x) = 2^k * exp(r) with
// k = round(x / ln 2) and a degree-6 minimax polynomial on |r| <= ln2 / 2.
// Inputs below -87 return exp(-87) ~ 1.6e-38 instead of underflowing.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// ExpNonPositive on 16 lanes, the same steps (FMA-contracted).
inline __m512 ExpNonPositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Mask of the first min(n, 16) lanes.
inline __mmask16 FirstLanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
#endif

// s[i] = exp(s[i] - max) for i < n (max >= every s[i]); returns the sum.
// Every element takes the same arithmetic whatever n is (the tail goes
// through the same 16-lane code, masked).
inline double ExpShiftSum(float* s, int n, float max) {
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(max);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = FirstLanes(n - i);
    const __m512 e = _mm512_maskz_mov_ps(
        k, ExpNonPositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m)));
    _mm512_mask_storeu_ps(s + i, k, e);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                                 _mm512_castps_pd(e), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
#else
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += (s[i] = ExpNonPositive(s[i] - max));
  return sum;
#endif
}

// The largest of s[0, n) (-inf for n = 0).
inline float MaxF32(const float* s, int n) {
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < n; i += 16) {
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), FirstLanes(n - i), s + i));
  }
  return _mm512_reduce_max_ps(m);
#else
  float m = -INFINITY;
  for (int i = 0; i < n; ++i) m = std::max(m, s[i]);
  return m;
#endif
}

// s[i] = fp16(s[i] * a) as fp32, for i < n.
inline void ScaleRoundToFp16(float a, float* s, int n) {
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = FirstLanes(n - i);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), av);
    _mm512_mask_storeu_ps(s + i, k, _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)));
  }
#else
  for (int i = 0; i < n; ++i) s[i] = RoundToFp16(s[i] * a);
#endif
}

#if defined(__AVX512F__)
// The sums of the 16 lanes of v[t], in two stages of one unpack/shuffle
// tree (15 adds instead of 16 separate horizontal reductions):
// SumEach4 folds 4 vectors into one whose 128-bit lane k holds the partial
// sums of v[0..3] (element t of each lane for v[t]); SumQuads adds the four
// lanes of w[k] (for v[4k..4k+3]) into lanes 4k..4k+3 of the result.
inline __m512 SumEach4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
  const __m512 u0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 u1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512d c = _mm512_castps_pd(u0), d = _mm512_castps_pd(u1);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
}

inline __m512 SumQuads(__m512 w0, __m512 w1, __m512 w2, __m512 w3) {
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x44),
                                   _mm512_shuffle_f32x4(w0, w1, 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w2, w3, 0x44),
                                   _mm512_shuffle_f32x4(w2, w3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88),
                       _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// Lane t of the result is the sum of the 16 lanes of v[t].
inline __m512 SumEach16(const __m512 v[16]) {
  return SumQuads(SumEach4(v[0], v[1], v[2], v[3]), SumEach4(v[4], v[5], v[6], v[7]),
                  SumEach4(v[8], v[9], v[10], v[11]), SumEach4(v[12], v[13], v[14], v[15]));
}

// One row's 16 partial sums for q . k (64 dims as 4 vectors) in ggml's
// vec_dot_f16 pairing: dims 0-15 with 32-47, 16-31 with 48-63.
__attribute__((always_inline)) inline __m512 RowPartials64(const float* q, __m512 k0, __m512 k1,
                                                          __m512 k2, __m512 k3) {
  const __m512 a02 =
      _mm512_fmadd_ps(_mm512_loadu_ps(q + 32), k2, _mm512_mul_ps(_mm512_loadu_ps(q), k0));
  const __m512 a13 =
      _mm512_fmadd_ps(_mm512_loadu_ps(q + 48), k3, _mm512_mul_ps(_mm512_loadu_ps(q + 16), k1));
  return _mm512_add_ps(a02, a13);
}

// Lane j: q . k_j for 16 rows k_j of 64 fp32 values (row j at k + 64 j),
// fused: two chains, one add per row, then one reduction tree for all 16.
inline __m512 Dot16Rows64(const float* q, const float* k) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) {
    const float* kj = k + j * 64;
    acc[j] = RowPartials64(q, _mm512_loadu_ps(kj), _mm512_loadu_ps(kj + 16),
                           _mm512_loadu_ps(kj + 32), _mm512_loadu_ps(kj + 48));
  }
  return SumEach16(acc);
}

// The 64 fp16 values at r as 4 vectors of fp32.
__attribute__((always_inline)) inline void Fp16Row64(const uint16_t* r, __m512 (&out)[4]) {
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 16 * i)));
  }
}

// acc[g] += p[g * p_stride] * v for g < kGroup: one value row (64 dims)
// into every head's accumulators.
template <int kGroup>
__attribute__((always_inline)) inline void AccumulateRow64(const float* p, size_t p_stride,
                                                           const __m512 (&v)[4],
                                                           __m512 (&acc)[kGroup][4]) {
  for (int g = 0; g < kGroup; ++g) {
    const __m512 pg = _mm512_set1_ps(p[g * p_stride]);
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(pg, v[j], acc[g][j]);
  }
}

// out[g] lane j: q[g] . k_j for g < kGroup and 16 fp16 rows k_j of 64
// values (row j at k + 64 j), bit-equal to Dot16Rows64 on the rows as
// fp32. Each row is converted once, in registers, for every head, and the
// reduction tree runs 4 rows at a time so few partials stay live.
template <int kGroup>
__attribute__((always_inline)) inline void Dot16RowsFp16x64(const float* const* q,
                                                            const uint16_t* k, __m512* out) {
  __m512 w[kGroup][4];
  for (int quad = 0; quad < 4; ++quad) {
    __m512 v[kGroup][4];
    for (int r = 0; r < 4; ++r) {
      __m512 kv[4];
      Fp16Row64(k + (quad * 4 + r) * 64, kv);
      for (int g = 0; g < kGroup; ++g) v[g][r] = RowPartials64(q[g], kv[0], kv[1], kv[2], kv[3]);
    }
    for (int g = 0; g < kGroup; ++g) w[g][quad] = SumEach4(v[g][0], v[g][1], v[g][2], v[g][3]);
  }
  for (int g = 0; g < kGroup; ++g) out[g] = SumQuads(w[g][0], w[g][1], w[g][2], w[g][3]);
}


// Lane j = _mm512_reduce_add_ps(v[j]), bit for bit: GCC's tree adds lanes
// i and i + 8, then i and i + 4 (of those 8), then 0 + 2 and 1 + 3, then
// the two. Done for 16 vectors at once with shuffles.
__attribute__((always_inline)) inline __m512 ReduceAddEach16(const __m512 (&v)[16]) {
  __m512 s[8];  // s[m]: lanes 0-7 a_i + a_{i+8} of v[2m], 8-15 those of v[2m+1]
  for (int m = 0; m < 8; ++m) {
    s[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0xEE));
  }
  __m512 t[4];  // t[p] quad k: s_j + s_{j+4} (j < 4) of v[4p + k]
  for (int p = 0; p < 4; ++p) {
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0xDD));
  }
  __m512 u[2];  // u[h] quad k: [t0+t2, t1+t3 of v[8h + k], the same of v[8h + 4 + k]]
  for (int h = 0; h < 2; ++h) {
    const __m512d a = _mm512_castps_pd(t[2 * h]), b = _mm512_castps_pd(t[2 * h + 1]);
    u[h] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // r quad k: [v[k], v[4 + k], v[8 + k], v[12 + k]]
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Lane j = v[j] sits at lane 4 (j % 4) + j / 4.
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}

// Lane j: DotF32(q, k + j * D, D) bit for bit (one FMA chain per key, then
// its reduction), for 16 fp32 rows of D values.
template <int D>
__attribute__((always_inline)) inline __m512 DotF32x16(const __m512 (&q)[D / 16], const float* k) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) {
    acc[j] = _mm512_setzero_ps();
    for (int c = 0; c < D / 16; ++c) {
      acc[j] = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k + j * D + 16 * c), acc[j]);
    }
  }
  return ReduceAddEach16(acc);
}

// out[h] = sum_t p[h][t] v_t, continued from out[h] for keys in order, kH
// heads sharing each value row (fp32, rows of D).
template <int D, int kH>
void AccumulateTile(const float* v, int n, const float* const* p, float* const* out) {
  constexpr int C = D / 16;
  __m512 acc[kH][C];
  for (int h = 0; h < kH; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_loadu_ps(out[h] + 16 * c);
  for (int t = 0; t < n; ++t, v += D) {
    __m512 pt[kH];
    for (int h = 0; h < kH; ++h) pt[h] = _mm512_set1_ps(p[h][t]);
    for (int c = 0; c < C; ++c) {
      const __m512 vv = _mm512_loadu_ps(v + 16 * c);
      for (int h = 0; h < kH; ++h) acc[h][c] = _mm512_fmadd_ps(pt[h], vv, acc[h][c]);
    }
  }
  for (int h = 0; h < kH; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[h] + 16 * c, acc[h][c]);
}

// AccumulateTile for any number of heads (D = 64 or 128), in chunks whose
// accumulators stay in registers.
template <int D>
void AccumulateHeads(const float* v, int n, const float* const* p, float* const* out, int heads) {
  constexpr int kMax = D == 64 ? 4 : 3;  // accumulators stay in registers
  while (heads > 0) {
    // Even chunks (7 = 4 + 3, 6 = 3 + 3).
    const int chunks = (heads + kMax - 1) / kMax;
    const int h = (heads + chunks - 1) / chunks;
    switch (h) {
      case 1: AccumulateTile<D, 1>(v, n, p, out); break;
      case 2: AccumulateTile<D, 2>(v, n, p, out); break;
      case 3: AccumulateTile<D, 3>(v, n, p, out); break;
      default: AccumulateTile<D, kMax>(v, n, p, out); break;
    }
    p += h;
    out += h;
    heads -= h;
  }
}
#endif

}  // namespace psa

PSA_END_AVX512_CODE

#endif  // PSA_COMPUTE_WORKER_KERNELS_FP16_KERNELS_H_
