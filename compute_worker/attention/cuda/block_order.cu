// Device ordering of the candidates (RunBlockOrder, psa_cuda.h): the CPU
// engine's order without a trip to the host. One CTA per (sequence, KV
// head) sorts its candidates' PsaOrderKeys with a bitonic network in
// global memory (the workspace: a power-of-two slot per (s, h), padded with
// the largest key), then writes the indices. A full sort, though PSA reads
// a few % of it: 91 passes over 8K keys at 128K tokens, L2-resident; a
// radix select of the prefix a step reads is the refinement if it shows.
#include <cuda_runtime.h>

#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"

namespace psa::cuda {
namespace {

constexpr int kOrderThreads = 256;

int PowerOfTwoAtLeast(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Grid (n_head_kv, n_seq); `slot` keys per (s, h) in work.
__global__ void __launch_bounds__(kOrderThreads)
    BlockOrderKernel(PagedKv kv, int sink_blocks, int local_blocks, const int* cand_begin,
                     const float* gscore, int slot, unsigned long long* work, int* order) {
  const int h = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  const int sh = s * kv.n_head_kv + h;
  const int n_keys = kv.seq_len[s];
  const int n = PsaLayoutOf(n_keys, n_keys / kPageRows, kPageRows, sink_blocks, local_blocks)
                    .n_cand();
  if (n <= 0) return;  // the whole CTA
  const int base = cand_begin[sh];
  unsigned long long* keys = work + static_cast<size_t>(sh) * slot;
  int len = 1;
  while (len < n) len <<= 1;
  for (int i = t; i < len; i += kOrderThreads) {
    keys[i] = i < n ? PsaOrderKey(gscore[base + i], i) : ~0ull;  // padding sorts last
  }
  __syncthreads();
  for (int k = 2; k <= len; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = t; i < len; i += kOrderThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const unsigned long long a = keys[i], b = keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = t; i < n; i += kOrderThreads) {
    order[base + i] = static_cast<int>(keys[i] & 0xffffffffull);
  }
}

}  // namespace

size_t BlockOrderWorkspaceBytes(int n_seq, int n_head_kv, int max_n_cand) {
  if (n_seq <= 0 || n_head_kv <= 0 || max_n_cand <= 0) return 0;
  return static_cast<size_t>(n_seq) * n_head_kv * PowerOfTwoAtLeast(max_n_cand) *
         sizeof(unsigned long long);
}

cudaError_t RunBlockOrder(const PagedKv& kv, const Selection& sel, const int* cand_begin,
                          int max_n_cand, const float* gscore, int* order, void* workspace,
                          cudaStream_t stream) {
  if (kv.n_seq <= 0 || kv.n_head_kv <= 0 || max_n_cand <= 0) return cudaSuccess;
  if (workspace == nullptr || gscore == nullptr || order == nullptr || cand_begin == nullptr) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(kv.n_head_kv, kv.n_seq);
  PSA_LAUNCH(BlockOrderKernel, grid, dim3(kOrderThreads), stream, kv, sel.sink_blocks,
             sel.local_blocks, cand_begin, gscore, PowerOfTwoAtLeast(max_n_cand),
             static_cast<unsigned long long*>(workspace), order);
  return cudaGetLastError();
}

}  // namespace psa::cuda
