// Decode attention over paged KV (psa_cuda.h): the dense split-KV kernel
// and its merge, the ordered (top-k / PSA) kernel, the plan and dispatch.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "compute_worker/attention/cuda/decode_blocks.cuh"
#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/cuda/device_utils.cuh"

namespace psa::cuda {
namespace {

using namespace decode;  // NOLINT: the building blocks

// Dense split-KV: the grid aims at this many CTAs per multiprocessor, and
// a split reads at least this many blocks.
constexpr int kCtasPerSm = 8;
constexpr int kMinSplitBlocks = 8;

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
                                      : PsaUnseenEstimate(w_unseen, t.seen_w, t.seen_sum);
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
