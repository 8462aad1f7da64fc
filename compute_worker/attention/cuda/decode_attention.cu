// Decode attention over paged KV (psa_cuda.h): the dense split-KV kernel
// and its merge, the ordered (top-k / PSA) kernel, the plan and dispatch.
//
// Work split: a CTA of kWarps warps serves one (sequence, KV head) and all
// G query heads of its group. Each warp attends whole blocks (pages) on
// its own, keeping its own online-softmax state per head; the CTA merges
// the warps' states (PsaMergeStates) for PSA's stop checks and at the end.
// Within a warp, a page row is D / 8 lanes of 16 bytes (8 fp16 each), so
// one load instruction covers 32 / (D / 8) rows and a page half (K or V)
// takes 16 / that loads per lane; every lane keeps its 8 dims of each
// head's query and accumulator in registers.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/cuda/device_utils.cuh"

namespace psa::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Dense split-KV: the grid aims at this many CTAs per multiprocessor, and
// a split reads at least this many blocks.
constexpr int kCtasPerSm = 8;
constexpr int kMinSplitBlocks = 8;

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

// Dense: grid (splits, n_head_kv, n_seq); split x reads blocks
// [x * bps, (x + 1) * bps). One split: the output directly; else partials
// in the workspace for MergeSplitsKernel.
template <int D, int G>
__global__ void __launch_bounds__(kThreads)
    DenseDecodeKernel(PagedKv kv, const float* q, int n_head, float scale, int splits, int bps,
                      DecodeOutputs out, Partial* ws_ml, float* ws_acc) {
  const int split = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
  const int n_keys = kv.seq_len[s];
  const int n_blocks = (n_keys + kPageRows - 1) / kPageRows;
  const int b0 = split * bps, b1 = PsaMin(n_blocks, b0 + bps);
  const int warp = threadIdx.x / 32;
  __shared__ Shared<D, G> sh;
  const size_t head0 = static_cast<size_t>(s) * n_head + static_cast<size_t>(h) * G;
  WarpState<D, G> st;
  InitWarp(st, q + head0 * D);
  const uint16_t* const* pages = kv.pages + kv.table[s * kv.n_head_kv + h];
  const float no_w[G] = {};
  constexpr unsigned kAll = (1u << G) - 1;
  for (int b = b0 + warp; b < b1; b += kWarps) {
    // This warp's next page on its way while this one computes.
    if (b + kWarps < b1) PrefetchL2<kPageBytes<D>>(pages[b + kWarps]);
    AttendBlock(st, pages[b], PsaMin(kPageRows, n_keys - b * kPageRows), scale, kAll, false, no_w);
  }
  if (splits == 1) {
    FinishCta(st, sh, out.out + head0 * D, D, nullptr, 0);
    if (threadIdx.x < G) {
      const size_t at = head0 + threadIdx.x;
      if (out.blocks != nullptr) out.blocks[at] = n_blocks;
      if (out.iterations != nullptr) out.iterations[at] = 1;
      if (out.captured != nullptr) out.captured[at] = 1.0f;
    }
  } else {
    FinishCta(st, sh, ws_acc + (head0 * splits + split) * D, static_cast<size_t>(splits) * D,
              ws_ml + head0 * splits + split, splits);
  }
}

// Dense, several splits: grid (n_head, n_seq), D threads.
template <int D>
__global__ void __launch_bounds__(D)
    MergeSplitsKernel(PagedKv kv, int n_head, int splits, const Partial* ws_ml,
                      const float* ws_acc, DecodeOutputs out) {
  const int head = blockIdx.x, s = blockIdx.y, i = threadIdx.x;
  const size_t at = static_cast<size_t>(s) * n_head + head;
  float m = -INFINITY, o = 0;
  double l = 0;
  for (int x = 0; x < splits; ++x) {
    const Partial p = ws_ml[at * splits + x];
    float mm, ra, rb;
    double ll;
    PsaMergeStates(m, l, p.m, p.l, &mm, &ll, &ra, &rb);
    o = o * ra + ws_acc[(at * splits + x) * D + i] * rb;
    m = mm;
    l = ll;
  }
  out.out[at * D + i] = o * static_cast<float>(1.0 / l);
  if (i == 0) {
    const int n_blocks = (kv.seq_len[s] + kPageRows - 1) / kPageRows;
    if (out.blocks != nullptr) out.blocks[at] = n_blocks;
    if (out.iterations != nullptr) out.iterations[at] = 1;
    if (out.captured != nullptr) out.captured[at] = 1.0f;
  }
}

// Top-k and PSA: grid (n_head_kv, n_seq). The CPU engine's attend loop
// (SparseAttention::RunQuery): the sinks and newest blocks, then the
// ordered candidates `group_blocks` at a time, each head's stop checked
// before every iteration.
template <int D, int G>
__global__ void __launch_bounds__(kThreads)
    OrderedDecodeKernel(PagedKv kv, const float* q, int n_head, float scale, Selection sel,
                        bool topk, Candidates cand, DecodeOutputs out) {
  const int h = blockIdx.x, s = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32;
  const int n_keys = kv.seq_len[s];
  const PsaLayout lay =
      PsaLayoutOf(n_keys, n_keys / kPageRows, kPageRows, sel.sink_blocks, sel.local_blocks);
  const int n_cand = lay.n_cand();
  const int take = PsaTake(topk, sel.top_k, lay);
  const int iter_blocks = topk ? PsaMax(1, take) : sel.group_blocks;
  const bool can_stop = !topk && sel.epsilon < 1.0f;
  const int base = cand.begin[s * kv.n_head_kv + h];
  const int* order = cand.order + base;
  const float* x = can_stop ? cand.stop_x + static_cast<size_t>(base) * G : nullptr;
  __shared__ Shared<D, G> sh;

  // The stop weights' largest score and total, per head (StopRule::Weigh).
  if (can_stop) {
    for (int g = 0; g < G; ++g) {
      const float* xg = x + static_cast<size_t>(g) * n_cand;
      float mx = -INFINITY;
      for (int c = tid; c < n_cand; c += kThreads) mx = fmaxf(mx, xg[c]);
      mx = CtaMax<kWarps>(mx, sh.red_f);
      double sum = 0;
      for (int c = tid; c < n_cand; c += kThreads) sum += expf(xg[c] - mx);
      sum = CtaSum<kWarps>(sum, sh.red_d);
      if (tid == 0) {
        sh.x_max[g] = mx;
        sh.w_total[g] = sum;
      }
    }
  }
  constexpr unsigned kAll = (1u << G) - 1;
  if (tid == 0) {
    sh.active = sh.deciding = kAll;
    for (int g = 0; g < G; ++g) {
      sh.captured[g] = 1.0f;
      sh.iterations[g] = 0;
    }
  }
  __syncthreads();

  const size_t head0 = static_cast<size_t>(s) * n_head + static_cast<size_t>(h) * G;
  WarpState<D, G> st;
  InitWarp(st, q + head0 * D);
  const uint16_t* const* pages = kv.pages + kv.table[s * kv.n_head_kv + h];
  // Iteration 1: the sinks and the newest blocks (the partial tail too).
  {
    const float no_w[G] = {};
    const int forced = lay.forced();
    for (int j = warp; j < forced; j += kWarps) {
      const int b = j < lay.sink ? j : lay.local_begin + (j - lay.sink);
      AttendBlock(st, pages[b], PsaMin(kPageRows, n_keys - b * kPageRows), scale, kAll, false,
                  no_w);
    }
  }
  int next = 0;  // position in the order
  for (int it = 1;; ++it) {
    // The pages this iteration reads unless every head stops, on their
    // way while the heads decide.
    for (int k = next + warp; k < PsaMin(take, next + iter_blocks); k += kWarps) {
      PrefetchL2<kPageBytes<D>>(pages[lay.sink + order[k]]);
    }
    PublishWarp(st, sh);
    __syncthreads();
    if (tid == 0) {
      int n_deciding = 0;
      unsigned active = sh.active, deciding = sh.deciding;
      for (int g = 0; g < G; ++g) {
        const unsigned bit = 1u << g;
        if (!(deciding & bit)) continue;
        sh.iterations[g] = it;
        if (take - next == 0) {
          sh.captured[g] = topk ? -1.0f : 1.0f;
          deciding &= ~bit;
          active &= ~bit;
          continue;
        }
        if (can_stop) {
          const HeadTotals t = CombineWarps(sh, g);
          if (PsaMayStop(t.blocks, sel.min_blocks)) {
            const double w_unseen = PsaUnseenWeight(sh.w_total[g], t.seen_w);
            const double unseen = sel.certified
                                      ? PsaUnseenCertified(w_unseen, kPageRows, sh.x_max[g], t.m)
                                      : PsaUnseenCentre(w_unseen, t.seen_w, t.seen_sum);
            const double p = PsaCaptured(t.l, unseen);
            if (PsaStops(p, sel.epsilon)) {
              sh.captured[g] = static_cast<float>(p);
              deciding &= ~bit;
              // With share_reads a stopped head attends what the group
              // reads on for its other heads (no extra bytes).
              if (!sel.share_reads) active &= ~bit;
              continue;
            }
          }
        }
        ++n_deciding;
      }
      sh.active = active;
      sh.deciding = deciding;
      sh.n_deciding = n_deciding;
    }
    __syncthreads();
    if (sh.n_deciding == 0) break;
    const unsigned active = sh.active;
    const int end = PsaMin(take, next + iter_blocks);
    for (int k = next + warp; k < end; k += kWarps) {
      const int c = order[k];
      float w[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        w[g] = can_stop ? expf(x[static_cast<size_t>(g) * n_cand + c] - sh.x_max[g]) : 0.0f;
      }
      AttendBlock(st, pages[lay.sink + c], kPageRows, scale, active, true, w);
    }
    next = end;
  }

  FinishCta(st, sh, out.out + head0 * D, D, nullptr, 0);
  if (tid < G) {
    const HeadTotals t = CombineWarps(sh, tid);
    const size_t at = head0 + tid;
    if (out.blocks != nullptr) out.blocks[at] = t.blocks;
    if (out.iterations != nullptr) out.iterations[at] = sh.iterations[tid];
    if (out.captured != nullptr) out.captured[at] = sh.captured[tid];
  }
}

}  // namespace

bool DecodeSupported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

cudaError_t PlanDecode(DecodeMode mode, int n_seq, int n_head, int n_head_kv, int head_dim,
                       float scale, const Selection& sel, int max_seq_len, int sm_count,
                       DecodePlan* plan) {
  if (n_seq <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 ||
      !DecodeSupported(head_dim, n_head / n_head_kv)) {
    return cudaErrorInvalidValue;
  }
  *plan = DecodePlan{};
  plan->mode = mode;
  plan->n_seq = n_seq;
  plan->n_head = n_head;
  plan->n_head_kv = n_head_kv;
  plan->head_dim = head_dim;
  plan->scale = scale;
  plan->sel = sel;
  if (mode == DecodeMode::kDense) {
    const int max_blocks = std::max(1, (max_seq_len + kPageRows - 1) / kPageRows);
    const long ctas = static_cast<long>(n_seq) * n_head_kv;
    const long want = static_cast<long>(kCtasPerSm) * std::max(1, sm_count);
    long splits = sm_count <= 0 ? 1 : (want + ctas - 1) / ctas;
    splits = std::min<long>(splits, std::max(1, max_blocks / kMinSplitBlocks));
    const int bps = static_cast<int>((max_blocks + splits - 1) / splits);
    plan->blocks_per_split = bps;
    plan->splits = (max_blocks + bps - 1) / bps;
    if (plan->splits > 1) {
      const size_t parts = static_cast<size_t>(n_seq) * n_head * plan->splits;
      plan->workspace_bytes = parts * (sizeof(Partial) + sizeof(float) * head_dim);
    }
  }
  return cudaSuccess;
}

cudaError_t RunDecode(const DecodePlan& plan, const PagedKv& kv, const float* q,
                      const Candidates& cand, const DecodeOutputs& out, void* workspace,
                      cudaStream_t stream) {
  const int group = plan.n_head / plan.n_head_kv;
  if (kv.head_dim != plan.head_dim || kv.n_head_kv != plan.n_head_kv || kv.n_seq != plan.n_seq) {
    return cudaErrorInvalidValue;
  }
  if (plan.mode != DecodeMode::kDense &&
      (cand.begin == nullptr || cand.order == nullptr ||
       (plan.mode == DecodeMode::kPsa && plan.sel.epsilon < 1.0f && cand.stop_x == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (plan.mode == DecodeMode::kDense && plan.splits > 1 && workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool ok = WithShape(plan.head_dim, group, [&](auto shape) {
    using S = decltype(shape);
    if (plan.mode == DecodeMode::kDense) {
      Partial* ws_ml = static_cast<Partial*>(workspace);
      const size_t parts = static_cast<size_t>(plan.n_seq) * plan.n_head * plan.splits;
      float* ws_acc = plan.splits > 1 ? reinterpret_cast<float*>(ws_ml + parts) : nullptr;
      const dim3 grid(plan.splits, plan.n_head_kv, plan.n_seq);
      auto* dense = &DenseDecodeKernel<S::kD, S::kG>;
      PSA_LAUNCH(dense, grid, kThreads, stream, kv, q, plan.n_head, plan.scale, plan.splits,
                 plan.blocks_per_split, out, ws_ml, ws_acc);
      if (plan.splits > 1) {
        auto* merge = &MergeSplitsKernel<S::kD>;
        PSA_LAUNCH(merge, dim3(plan.n_head, plan.n_seq), S::kD, stream, kv, plan.n_head,
                   plan.splits, ws_ml, ws_acc, out);
      }
    } else {
      auto* ordered = &OrderedDecodeKernel<S::kD, S::kG>;
      PSA_LAUNCH(ordered, dim3(plan.n_head_kv, plan.n_seq), kThreads, stream, kv, q, plan.n_head,
                 plan.scale, plan.sel, plan.mode == DecodeMode::kTopK, cand, out);
    }
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace psa::cuda
