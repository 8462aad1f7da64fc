// Small inline kernels over fp16 KV rows shared by the attention backends:
// row conversion, dot products and axpy. F16C/AVX2 when the build has them
// (AVX-512 code comes from the compiler widening the fp32 loops).
#ifndef PSA_COMPUTE_WORKER_RUNTIME_FP16_KERNELS_H_
#define PSA_COMPUTE_WORKER_RUNTIME_FP16_KERNELS_H_

#include <cstdint>

#include "compute_worker/model/ggml_types.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace psa {

// dst[0..n) = fp16 src[0..n) as fp32.
inline void Fp16RowToFp32(const uint16_t* src, float* dst, int n) {
  int i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

inline float DotF32(const float* a, const float* b, int n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
inline void AxpyF32(float a, const float* x, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void ScaleF32(float a, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] *= a;
}

inline float RoundToFp16(float x) { return Fp16ToFp32(Fp32ToFp16(x)); }

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_FP16_KERNELS_H_
