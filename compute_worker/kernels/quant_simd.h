// Integer SIMD helpers shared by the quantised dot kernels (matmul.cc,
// kquant_dot.cc): u8 x s8 dot products (VNNI where the build has it),
// nibble and bit unpacking, horizontal sums. AVX2 builds only; stateless.
#ifndef PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_
#define PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_

#if defined(__AVX2__)

#include <immintrin.h>

#include <cstdint>

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

}  // namespace psa::simd

PSA_END_AVX512_CODE

#endif  // __AVX2__

#endif  // PSA_COMPUTE_WORKER_KERNELS_QUANT_SIMD_H_
