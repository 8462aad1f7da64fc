// The building blocks of the decode kernels (decode_attention.cu): each
// warp's online-softmax state over whole pages, the CTA's shared state,
// and the merges. Internal to attention/cuda/; device code.
//
// Work split: a CTA of kWarps warps serves one (sequence, KV head) and all
// G query heads of its group. Each warp attends whole blocks (pages) on
// its own, keeping its own online-softmax state per head; the CTA merges
// the warps' states (PsaMergeStates) for PSA's stop checks and at the end.
// Within a warp, a page row is D / 8 lanes of 16 bytes (8 fp16 each), so
// one load instruction covers 32 / (D / 8) rows and a page half (K or V)
// takes 16 / that loads per lane; every lane keeps its 8 dims of each
// head's query and accumulator in registers.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_CUDA_DECODE_BLOCKS_CUH_
#define PSA_COMPUTE_WORKER_ATTENTION_CUDA_DECODE_BLOCKS_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/cuda/device_utils.cuh"

namespace psa::cuda::decode {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <int D>
constexpr int kPageBytes = 2 * kPageRows * D * 2;  // K and V, fp16

template <int D>
struct Lanes {
  static constexpr int kPerRow = D / 8;             // lanes sharing one page row
  static constexpr int kRowGroups = 32 / kPerRow;   // rows one load covers
  static constexpr int kLoads = kPageRows / kRowGroups;  // loads per page half
};

// One warp's state for the G heads of its group.
template <int D, int G>
struct WarpState {
  float q[G][8];    // this lane's 8 dims of each head's query
  float acc[G][8];  // sum of exp(s - m) * v over this lane's rows, its 8 dims
  float m[G];       // running max (lane-uniform, as the rest)
  double l[G];         // exp-sum in the running scale
  double seen_sum[G];  // ... of the candidate blocks
  double seen_w[G];    // stop weights of the candidate blocks
  int blocks[G];
};

// What the warps exchange through shared memory.
template <int D, int G>
struct Shared {
  float acc[kWarps][G][D];
  float m[kWarps][G];
  double l[kWarps][G];
  double seen_sum[kWarps][G];
  double seen_w[kWarps][G];
  int blocks[kWarps][G];
  float x_max[G];     // PSA: largest stop score of each head
  double w_total[G];  // PSA: total stop weight of each head
  float captured[G];
  int iterations[G];
  unsigned active, deciding;  // head bit masks
  int n_deciding;
  float red_f[kWarps];
  double red_d[kWarps];
};

// A dense split's partial result for one query head.
struct Partial {
  float m;
  double l;
};

template <int D, int G>
__device__ __forceinline__ void InitWarp(WarpState<D, G>& st, const float* q) {
  const int col = (threadIdx.x & 31) % Lanes<D>::kPerRow;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float4* q4 = reinterpret_cast<const float4*>(q + g * D + col * 8);
    const float4 a = q4[0], b = q4[1];
    st.q[g][0] = a.x;
    st.q[g][1] = a.y;
    st.q[g][2] = a.z;
    st.q[g][3] = a.w;
    st.q[g][4] = b.x;
    st.q[g][5] = b.y;
    st.q[g][6] = b.z;
    st.q[g][7] = b.w;
#pragma unroll
    for (int j = 0; j < 8; ++j) st.acc[g][j] = 0.0f;
    st.m[g] = -INFINITY;
    st.l[g] = 0;
    st.seen_sum[g] = 0;
    st.seen_w[g] = 0;
    st.blocks[g] = 0;
  }
}

// Exact attention over one page (n_rows valid rows) for the heads in
// `active`. cand: a candidate block (counts towards PSA's seen mass, with
// stop weight w[g]). Warp-uniform arguments; every lane must call it.
template <int D, int G>
__device__ __forceinline__ void AttendBlock(WarpState<D, G>& st, const uint16_t* page, int n_rows,
                                            float scale, unsigned active, bool cand,
                                            const float (&w)[G]) {
  using L = Lanes<D>;
  const int lane = threadIdx.x & 31;
  const int col = lane % L::kPerRow, rg = lane / L::kPerRow;
  const uint4* k4 = reinterpret_cast<const uint4*>(page);
  const uint4* v4 = reinterpret_cast<const uint4*>(page + kPageRows * D);
  uint4 kr[L::kLoads], vr[L::kLoads];
#pragma unroll
  for (int i = 0; i < L::kLoads; ++i) {
    const int t = i * L::kRowGroups + rg;
    if (t < n_rows) {
      kr[i] = __ldg(k4 + t * (D / 8) + col);
      vr[i] = __ldg(v4 + t * (D / 8) + col);
    } else {  // rows past the sequence: never read (they may hold garbage)
      kr[i] = make_uint4(0, 0, 0, 0);
      vr[i] = make_uint4(0, 0, 0, 0);
    }
  }
  // Scores of this lane's rows for every head (then probabilities).
  float s[L::kLoads][G];
#pragma unroll
  for (int i = 0; i < L::kLoads; ++i) {
    float k[8];
    Unpack8(kr[i], k);
    const bool valid = i * L::kRowGroups + rg < n_rows;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float d = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) d = fmaf(st.q[g][j], k[j], d);
      d = SumWithin<L::kPerRow>(d);
      s[i][g] = valid ? d * scale : -INFINITY;
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (!((active >> g) & 1u)) continue;
    float bm = -INFINITY;
#pragma unroll
    for (int i = 0; i < L::kLoads; ++i) bm = fmaxf(bm, s[i][g]);
    bm = MaxAcross<L::kPerRow>(bm);
    if (bm > st.m[g]) {
      const float r = PsaRescale(st.m[g], bm);  // 0 on the first block
      st.l[g] *= r;
      st.seen_sum[g] *= r;
#pragma unroll
      for (int j = 0; j < 8; ++j) st.acc[g][j] *= r;
      st.m[g] = bm;
    }
    float sum = 0;
#pragma unroll
    for (int i = 0; i < L::kLoads; ++i) {
      const float p = i * L::kRowGroups + rg < n_rows ? expf(s[i][g] - st.m[g]) : 0.0f;
      s[i][g] = p;
      sum += p;
    }
    sum = SumAcross<L::kPerRow>(sum);  // each row's p sits in kPerRow lanes: sum across groups
    st.l[g] += sum;
    if (cand) {
      st.seen_sum[g] += sum;
      st.seen_w[g] += w[g];
    }
    ++st.blocks[g];
  }
#pragma unroll
  for (int i = 0; i < L::kLoads; ++i) {
    float v[8];
    Unpack8(vr[i], v);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (!((active >> g) & 1u)) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) st.acc[g][j] = fmaf(s[i][g], v[j], st.acc[g][j]);
    }
  }
}

// Lane 0 of each warp writes its scalar state for the CTA.
template <int D, int G>
__device__ __forceinline__ void PublishWarp(const WarpState<D, G>& st, Shared<D, G>& sh) {
  if ((threadIdx.x & 31) != 0) return;
  const int w = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    sh.m[w][g] = st.m[g];
    sh.l[w][g] = st.l[g];
    sh.seen_sum[w][g] = st.seen_sum[g];
    sh.seen_w[w][g] = st.seen_w[g];
    sh.blocks[w][g] = st.blocks[g];
  }
}

// Head g's state over all warps (after PublishWarp and a barrier).
struct HeadTotals {
  float m;
  double l, seen_sum, seen_w;
  int blocks;
};
template <int D, int G>
__device__ __forceinline__ HeadTotals CombineWarps(const Shared<D, G>& sh, int g) {
  HeadTotals t{sh.m[0][g], sh.l[0][g], sh.seen_sum[0][g], sh.seen_w[0][g], sh.blocks[0][g]};
  for (int w = 1; w < kWarps; ++w) {
    float m, ra, rb;
    double l;
    PsaMergeStates(t.m, t.l, sh.m[w][g], sh.l[w][g], &m, &l, &ra, &rb);
    t.seen_sum = t.seen_sum * ra + sh.seen_sum[w][g] * rb;
    t.m = m;
    t.l = l;
    t.seen_w += sh.seen_w[w][g];
    t.blocks += sh.blocks[w][g];
  }
  return t;
}

// Merges the warps' accumulators. partial == nullptr: out[g * D + i] =
// the normalised output of head g; else the unnormalised sum goes to
// out[g * out_stride_g + i] and (m, l) to partial[g * partial_stride].
template <int D, int G>
__device__ __forceinline__ void FinishCta(WarpState<D, G>& st, Shared<D, G>& sh, float* out,
                                          size_t out_stride_g, Partial* partial,
                                          size_t partial_stride) {
  using L = Lanes<D>;
  const int lane = threadIdx.x & 31, w = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < 8; ++j) st.acc[g][j] = SumAcross<L::kPerRow>(st.acc[g][j]);
  }
  if (lane < L::kPerRow) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < 8; ++j) sh.acc[w][g][lane * 8 + j] = st.acc[g][j];
    }
  }
  PublishWarp(st, sh);
  __syncthreads();
  for (int t = threadIdx.x; t < G * D; t += kThreads) {
    const int g = t / D, i = t % D;
    float m = sh.m[0][g];
    double l = sh.l[0][g];
    float o = sh.acc[0][g][i];
    for (int k = 1; k < kWarps; ++k) {
      float mm, ra, rb;
      double ll;
      PsaMergeStates(m, l, sh.m[k][g], sh.l[k][g], &mm, &ll, &ra, &rb);
      o = o * ra + sh.acc[k][g][i] * rb;
      m = mm;
      l = ll;
    }
    if (partial == nullptr) {
      out[g * out_stride_g + i] = o * static_cast<float>(1.0 / l);
    } else {
      out[g * out_stride_g + i] = o;
      if (i == 0) partial[g * partial_stride] = Partial{m, l};
    }
  }
}

}  // namespace psa::cuda::decode

#endif  // PSA_COMPUTE_WORKER_ATTENTION_CUDA_DECODE_BLOCKS_CUH_
