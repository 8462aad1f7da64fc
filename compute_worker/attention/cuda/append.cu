// Appending a decode step's new K / V rows to the paged cache, and the
// metadata (key max / min / mean) of the block a row completes (RunAppend,
// psa_cuda.h). One CTA per (sequence, KV head), a thread per dimension:
// thread d writes dimension d of the new rows and, when the block is full,
// reduces dimension d over its 16 keys (the earlier rows came from earlier
// steps, so no barrier is needed).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/cuda/psa_cuda.h"

namespace psa::cuda {
namespace {

template <int D>
__global__ void __launch_bounds__(D)
    AppendKernel(PagedKv kv, const uint16_t* const* host_pages, const int* pos, const float* k,
                 const float* v, uint16_t* kmax, uint16_t* kmin, uint16_t* kmean) {
  const int h = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
  const int sh = s * kv.n_head_kv + h;
  const int p = pos[s], row = p % kPageRows;
  const int page = kv.table[sh] + p / kPageRows;
  const size_t at = static_cast<size_t>(sh) * D + d;
  const __half kh = __float2half_rn(k[at]), vh = __float2half_rn(v[at]);
  __half* copies[2] = {reinterpret_cast<__half*>(const_cast<uint16_t*>(kv.pages[page])),
                       host_pages != nullptr
                           ? reinterpret_cast<__half*>(const_cast<uint16_t*>(host_pages[page]))
                           : nullptr};
  if (copies[1] == copies[0]) copies[1] = nullptr;
  for (__half* pg : copies) {
    if (pg == nullptr) continue;
    pg[row * D + d] = kh;
    pg[(kPageRows + row) * D + d] = vh;
  }
  if (row != kPageRows - 1 || kmax == nullptr || kmin == nullptr || kmean == nullptr) return;
  const __half* keys = copies[0];
  float hi = -INFINITY, lo = INFINITY, sum = 0;
  for (int t = 0; t < kPageRows; ++t) {
    const float x = __half2float(t == row ? kh : keys[t * D + d]);
    hi = fmaxf(hi, x);
    lo = fminf(lo, x);
    sum = __fadd_rn(sum, x);  // in row order, unfused: the CPU's sum
  }
  kmax[static_cast<size_t>(page) * D + d] = __half_as_ushort(__float2half_rn(hi));  // exact
  kmin[static_cast<size_t>(page) * D + d] = __half_as_ushort(__float2half_rn(lo));
  kmean[static_cast<size_t>(page) * D + d] = __half_as_ushort(__float2half_rn(sum / kPageRows));
}

}  // namespace

cudaError_t RunAppend(const PagedKv& kv, const uint16_t* const* host_pages, const int* pos,
                      const float* k, const float* v, uint16_t* kmax, uint16_t* kmin,
                      uint16_t* kmean, cudaStream_t stream) {
  if (kv.n_seq <= 0 || kv.n_head_kv <= 0) return cudaSuccess;
  if (pos == nullptr || k == nullptr || v == nullptr) return cudaErrorInvalidValue;
  // The metadata comes whole or not at all.
  if ((kmax == nullptr) != (kmin == nullptr) || (kmax == nullptr) != (kmean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(kv.n_head_kv, kv.n_seq);
  if (kv.head_dim == 64) {
    PSA_LAUNCH(AppendKernel<64>, grid, dim3(64), stream, kv, host_pages, pos, k, v, kmax, kmin,
               kmean);
  } else if (kv.head_dim == 128) {
    PSA_LAUNCH(AppendKernel<128>, grid, dim3(128), stream, kv, host_pages, pos, k, v, kmax, kmin,
               kmean);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace psa::cuda
