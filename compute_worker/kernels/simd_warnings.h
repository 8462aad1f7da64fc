// Silences one GCC false positive around code that calls AVX-512 intrinsics.
//
// GCC 12's <immintrin.h> builds many AVX-512 intrinsics on an "undefined"
// vector, `__m512 __Y = __Y;` (_mm512_undefined_ps() and friends), and once
// they are inlined -Wmaybe-uninitialized / -Wuninitialized report every
// use: hundreds of warnings per build, none about our code. GCC bug 105593;
// the headers of later GCC releases silence it themselves. The build uses
// -Werror (PSA_WERROR), so code that calls these intrinsics, directly or
// through compute_worker/kernels/fp16_kernels.h, goes between
//   PSA_BEGIN_AVX512_CODE ... PSA_END_AVX512_CODE
// at namespace scope. The pragmas follow inlining, so wrapping the inline
// helpers where the intrinsics are called covers their callers too.
// Other warnings, and these two outside the wrapped code, stay on.
#ifndef PSA_COMPUTE_WORKER_KERNELS_SIMD_WARNINGS_H_
#define PSA_COMPUTE_WORKER_KERNELS_SIMD_WARNINGS_H_

#if defined(__GNUC__) && !defined(__clang__)
#define PSA_BEGIN_AVX512_CODE                                   \
  _Pragma("GCC diagnostic push")                                \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")  \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define PSA_END_AVX512_CODE _Pragma("GCC diagnostic pop")
#else
#define PSA_BEGIN_AVX512_CODE
#define PSA_END_AVX512_CODE
#endif

#endif  // PSA_COMPUTE_WORKER_KERNELS_SIMD_WARNINGS_H_
