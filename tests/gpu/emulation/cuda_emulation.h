// Runs the CUDA kernels' own source (compute_worker/attention/cuda/*.cu)
// on the CPU, so that the GPU tests check their logic on machines without
// a GPU: a CTA's threads are fibers (ucontext) switched at every barrier,
// __shared__ variables are statics (CTAs run one at a time), warp shuffles
// exchange through per-warp slots, and "device" memory is host memory (the
// CUDA runtime calls the tests make are emulated in cuda_emulation.cc).
// It checks indexing, reductions, barrier placement and the algorithm; not
// the memory model, alignment faults, timing or anything between CTAs.
//
// Include this first, then the .cu files (emulated_kernels.cc does).
// The binary must not link the real CUDA runtime.
#ifndef PSA_TESTS_GPU_EMULATION_CUDA_EMULATION_H_
#define PSA_TESTS_GPU_EMULATION_CUDA_EMULATION_H_

#ifndef PSA_CUDA_EMULATION
#define PSA_CUDA_EMULATION 1
#endif
// One instance per kernel instantiation, shared by the CTA's fibers.
#define __shared__ static

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>

#define __launch_bounds__(...)

namespace psa_emu {

const uint3& ThreadIdx();
const uint3& BlockIdx();
void SyncThreads();
// The value of lane (this lane ^ lane_mask) of this warp, all 32 lanes
// taking part.
uint64_t ShuffleXor(uint64_t bits, int lane_mask);
// Runs body once per thread of every CTA of the grid, CTA after CTA.
void Launch(dim3 grid, dim3 block, const std::function<void()>& body);

}  // namespace psa_emu

#define threadIdx (::psa_emu::ThreadIdx())
#define blockIdx (::psa_emu::BlockIdx())
#define PSA_LAUNCH(kernel, grid, block, stream, ...) \
  ::psa_emu::Launch(grid, block, [&] { kernel(__VA_ARGS__); })

inline void __syncthreads() { ::psa_emu::SyncThreads(); }
// An IEEE single add, never fused (g++ contracts only multiply-adds).
inline float __fadd_rn(float a, float b) { return a + b; }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "8 bytes at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::psa_emu::ShuffleXor(bits, lane_mask);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// CTAs run one at a time and a CTA's fibers switch only at barriers, so a
// read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}

#endif  // PSA_TESTS_GPU_EMULATION_CUDA_EMULATION_H_
