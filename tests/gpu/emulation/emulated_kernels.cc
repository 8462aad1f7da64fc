// The CUDA kernels' sources compiled for the CPU emulation
// (cuda_emulation.h): psa_cuda_emulated_test links this instead of
// psa_cuda and the CUDA runtime. Built with -Wno-unknown-pragmas
// (#pragma unroll).
#include "tests/gpu/emulation/cuda_emulation.h"

#include "compute_worker/attention/cuda/append.cu"

#include "compute_worker/attention/cuda/block_order.cu"
#include "compute_worker/attention/cuda/block_scores.cu"
#include "compute_worker/attention/cuda/decode_attention.cu"
#include "compute_worker/attention/cuda/page_pool.cu"
