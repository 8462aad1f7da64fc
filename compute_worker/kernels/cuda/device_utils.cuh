// Device helpers the CUDA kernels share: warp reductions over lane
// groups, fp16 x 8 unpacking, CTA-wide reductions. nvcc only.
#ifndef PSA_COMPUTE_WORKER_KERNELS_CUDA_DEVICE_UTILS_CUH_
#define PSA_COMPUTE_WORKER_KERNELS_CUDA_DEVICE_UTILS_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace psa::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over each aligned group of kWidth consecutive lanes (kWidth a power
// of two <= 32); every lane of a group gets its group's sum.
template <int kWidth>
__device__ __forceinline__ float SumWithin(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum / max over the lanes that share lane % kStride (kStride a power of
// two <= 32): across the groups SumWithin<kStride> reduces within.
template <int kStride>
__device__ __forceinline__ float SumAcross(float v) {
#pragma unroll
  for (int o = kStride; o < 32; o *= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <int kStride>
__device__ __forceinline__ float MaxAcross(float v) {
#pragma unroll
  for (int o = kStride; o < 32; o *= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// 8 fp16 values (16 bytes) as fp32.
__device__ __forceinline__ void Unpack8(const uint4& raw, float (&out)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Asks for the kBytes at p (128-byte aligned) into L2, the warp's lanes a
// line each: a hint that lets the loads that follow find them there.
// Device code only; nothing elsewhere (nvcc's host pass, a CPU emulation).
template <int kBytes>
__device__ __forceinline__ void PrefetchL2(const void* p) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
#pragma unroll
  for (int off = (threadIdx.x & 31) * 128; off < kBytes; off += 32 * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
  }
#else
  (void)p;
#endif
}

// CTA-wide max / sum of one value per thread; every thread gets the
// result. kWarps: warps in the CTA; scratch: kWarps entries of shared
// memory. Contains __syncthreads(): call from every thread.
template <int kWarps>
__device__ __forceinline__ float CtaMax(float v, float* scratch) {
  v = MaxAcross<1>(v);
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}
template <int kWarps>
__device__ __forceinline__ double CtaSum(double v, double* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += scratch[w];
  __syncthreads();
  return s;
}

}  // namespace psa::cuda

#endif  // PSA_COMPUTE_WORKER_KERNELS_CUDA_DEVICE_UTILS_CUH_
