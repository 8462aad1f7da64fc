// Selection kernels (psa_cuda.h): block scores from per-block key min / max
// / mean (RunBlockScores) and that metadata from the pages
// (RunBlockMetadata). One warp per block; lanes over dimensions, 2 at a time
// (half2).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/cuda/device_utils.cuh"

namespace psa::cuda {
namespace {

constexpr int kWarpsPerCta = 8;

// Grid (ceil(max_n_cand / kWarpsPerCta), n_head_kv, n_seq): warp w of CTA
// x scores candidate x * kWarpsPerCta + w of (s, h) for every head of the
// group (the sums over dims in the warp's order, not PsaBoxBound's).
template <int D, int G>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
    BlockScoresKernel(PagedKv kv, int n_head, float scale, int sink_blocks, int local_blocks,
                      const float* q, const int* cand_begin, float* ub, float* centre,
                      float* mean, float* gscore) {
  const int h = blockIdx.y, s = blockIdx.z;
  const int c = blockIdx.x * kWarpsPerCta + threadIdx.x / 32, lane = threadIdx.x & 31;
  const int n_keys = kv.seq_len[s];
  const PsaLayout lay =
      PsaLayoutOf(n_keys, n_keys / kPageRows, kPageRows, sink_blocks, local_blocks);
  const int n_cand = lay.n_cand();
  if (c >= n_cand) return;  // the whole warp
  const int sh = s * kv.n_head_kv + h;
  const size_t meta = static_cast<size_t>(kv.table[sh] + lay.sink + c) * D;
  constexpr int kPairs = D / 64;  // half2 per lane
  float hi[2 * kPairs], lo[2 * kPairs], mu[2 * kPairs];
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const float2 a = __half22float2(reinterpret_cast<const __half2*>(kv.kmax + meta)[lane + 32 * p]);
    const float2 b = __half22float2(reinterpret_cast<const __half2*>(kv.kmin + meta)[lane + 32 * p]);
    const float2 m = mean != nullptr
                         ? __half22float2(reinterpret_cast<const __half2*>(kv.kmean + meta)[lane + 32 * p])
                         : make_float2(0.0f, 0.0f);
    hi[2 * p] = a.x;
    hi[2 * p + 1] = a.y;
    lo[2 * p] = b.x;
    lo[2 * p + 1] = b.y;
    mu[2 * p] = m.x;
    mu[2 * p + 1] = m.y;
  }
  const float* qh = q + (static_cast<size_t>(s) * n_head + static_cast<size_t>(h) * G) * D;
  const size_t base = static_cast<size_t>(cand_begin[sh]);
  float best = -INFINITY;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float u = 0, cs = 0, ms = 0;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      const float2 qv = reinterpret_cast<const float2*>(qh + g * D)[lane + 32 * p];
      u += PsaBoxTerm(qv.x, hi[2 * p], lo[2 * p]) + PsaBoxTerm(qv.y, hi[2 * p + 1], lo[2 * p + 1]);
      cs += PsaCentreTerm(qv.x, hi[2 * p], lo[2 * p]) +
            PsaCentreTerm(qv.y, hi[2 * p + 1], lo[2 * p + 1]);
      ms += qv.x * mu[2 * p] + qv.y * mu[2 * p + 1];
    }
    u = scale * SumWithin<32>(u);
    cs = scale * SumWithin<32>(cs);
    ms = scale * SumWithin<32>(ms);
    best = fmaxf(best, u);
    if (lane == 0) {
      const size_t at = base * G + static_cast<size_t>(g) * n_cand + c;
      if (ub != nullptr) ub[at] = u;
      if (centre != nullptr) centre[at] = cs;
      if (mean != nullptr) mean[at] = ms;
    }
  }
  if (lane == 0 && gscore != nullptr) gscore[base + c] = best;
}

// Grid (n_head_kv, n_seq): the rank estimate's group scores of (s, h)'s
// candidates from the heads' bounds and centre scores, as the CPU's
// EstimateGroupScores computes them (expf here: equal to within rounding). One CTA per (s, h): each head's max and exp-sum over every
// candidate are CTA reductions.
constexpr int kRankThreads = 256;
template <int G>
__global__ void __launch_bounds__(kRankThreads)
    RankEstimateKernel(PagedKv kv, int sink_blocks, int local_blocks, const int* cand_begin,
                       const float* ub, const float* centre, float* gscore) {
  __shared__ float max_scratch[kRankThreads / 32];
  __shared__ double sum_scratch[kRankThreads / 32];
  const int h = blockIdx.x, s = blockIdx.y;
  const int n_keys = kv.seq_len[s];
  const PsaLayout lay =
      PsaLayoutOf(n_keys, n_keys / kPageRows, kPageRows, sink_blocks, local_blocks);
  const int n_cand = lay.n_cand();
  if (n_cand <= 0) return;  // the whole CTA
  const size_t base = static_cast<size_t>(cand_begin[s * kv.n_head_kv + h]);
  float* out = gscore + base;
  for (int c = threadIdx.x; c < n_cand; c += kRankThreads) out[c] = 0.0f;
  for (int g = 0; g < G; ++g) {
    const float* u = ub + base * G + static_cast<size_t>(g) * n_cand;
    const float* x = centre + base * G + static_cast<size_t>(g) * n_cand;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < n_cand; c += kRankThreads) m = fmaxf(m, PsaRankScore(x[c], u[c]));
    m = CtaMax<kRankThreads / 32>(m, max_scratch);
    if (!isfinite(m)) continue;  // the same for the whole CTA
    double sum = 0;
    for (int c = threadIdx.x; c < n_cand; c += kRankThreads) {
      sum += expf(PsaRankScore(x[c], u[c]) - m);
    }
    const float inv = static_cast<float>(1.0 / CtaSum<kRankThreads / 32>(sum, sum_scratch));
    for (int c = threadIdx.x; c < n_cand; c += kRankThreads) {
      out[c] += expf(PsaRankScore(x[c], u[c]) - m) * inv;
    }
  }
  for (int c = threadIdx.x; c < n_cand; c += kRankThreads) {
    out[c] = PsaShareLog(out[c]);
  }
}

// Grid (ceil(max_blocks / kWarpsPerCta), n_head_kv, n_seq): warp w of CTA
// x takes full block x * kWarpsPerCta + w of (s, h).
template <int D>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
    BlockMetadataKernel(PagedKv kv, uint16_t* kmax, uint16_t* kmin, uint16_t* kmean) {
  const int h = blockIdx.y, s = blockIdx.z;
  const int b = blockIdx.x * kWarpsPerCta + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (b >= kv.seq_len[s] / kPageRows) return;  // the whole warp
  const int t0 = kv.table[s * kv.n_head_kv + h];
  const __half2* page = reinterpret_cast<const __half2*>(kv.pages[t0 + b]);
  __half2* mx = reinterpret_cast<__half2*>(kmax + static_cast<size_t>(t0 + b) * D);
  __half2* mn = reinterpret_cast<__half2*>(kmin + static_cast<size_t>(t0 + b) * D);
  __half2* me = reinterpret_cast<__half2*>(kmean + static_cast<size_t>(t0 + b) * D);
  constexpr int kPairs = D / 64;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int i = lane + 32 * p;  // pair index within a row
    float2 hi = make_float2(-INFINITY, -INFINITY), lo = make_float2(INFINITY, INFINITY);
    float2 sum = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int t = 0; t < kPageRows; ++t) {
      const float2 k = __half22float2(page[t * (D / 2) + i]);
      hi.x = fmaxf(hi.x, k.x);
      hi.y = fmaxf(hi.y, k.y);
      lo.x = fminf(lo.x, k.x);
      lo.y = fminf(lo.y, k.y);
      sum.x = __fadd_rn(sum.x, k.x);  // in row order, unfused: the CPU's sum
      sum.y = __fadd_rn(sum.y, k.y);
    }
    mx[i] = __floats2half2_rn(hi.x, hi.y);  // exact: fp16 inputs
    mn[i] = __floats2half2_rn(lo.x, lo.y);
    me[i] = __floats2half2_rn(sum.x / kPageRows, sum.y / kPageRows);  // exact division
  }
}

}  // namespace

cudaError_t RunBlockScores(const PagedKv& kv, int n_head, float scale, const Selection& sel,
                           const float* q, const int* cand_begin, int max_n_cand, float* ub,
                           float* centre, float* mean, float* gscore, cudaStream_t stream) {
  if (kv.n_head_kv <= 0 || n_head % kv.n_head_kv != 0 || kv.kmax == nullptr ||
      kv.kmin == nullptr || cand_begin == nullptr || (mean != nullptr && kv.kmean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool estimate = !sel.rank_by_bound && gscore != nullptr;
  if (estimate && (ub == nullptr || centre == nullptr)) return cudaErrorInvalidValue;
  if (max_n_cand <= 0 || kv.n_seq <= 0) return cudaSuccess;
  const dim3 grid((max_n_cand + kWarpsPerCta - 1) / kWarpsPerCta, kv.n_head_kv, kv.n_seq);
  const bool ok = WithShape(kv.head_dim, n_head / kv.n_head_kv, [&](auto shape) {
    using S = decltype(shape);
    auto* kernel = &BlockScoresKernel<S::kD, S::kG>;
    PSA_LAUNCH(kernel, grid, 32 * kWarpsPerCta, stream, kv, n_head, scale, sel.sink_blocks,
               sel.local_blocks, q, cand_begin, ub, centre, mean, estimate ? nullptr : gscore);
    if (estimate) {
      auto* rank = &RankEstimateKernel<S::kG>;
      PSA_LAUNCH(rank, dim3(kv.n_head_kv, kv.n_seq), kRankThreads, stream, kv, sel.sink_blocks,
                 sel.local_blocks, cand_begin, ub, centre, gscore);
    }
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t RunBlockMetadata(const PagedKv& kv, int max_blocks, uint16_t* kmax, uint16_t* kmin,
                             uint16_t* kmean, cudaStream_t stream) {
  if (kmax == nullptr || kmin == nullptr || kmean == nullptr) return cudaErrorInvalidValue;
  if (max_blocks <= 0 || kv.n_seq <= 0 || kv.n_head_kv <= 0) return cudaSuccess;
  const dim3 grid((max_blocks + kWarpsPerCta - 1) / kWarpsPerCta, kv.n_head_kv, kv.n_seq);
  void (*kernel)(PagedKv, uint16_t*, uint16_t*, uint16_t*) = nullptr;
  if (kv.head_dim == 64) kernel = &BlockMetadataKernel<64>;
  if (kv.head_dim == 128) kernel = &BlockMetadataKernel<128>;
  if (kernel == nullptr) return cudaErrorInvalidValue;
  PSA_LAUNCH(kernel, grid, 32 * kWarpsPerCta, stream, kv, kmax, kmin, kmean);
  return cudaGetLastError();
}

}  // namespace psa::cuda
