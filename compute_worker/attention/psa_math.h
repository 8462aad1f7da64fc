// The math block-sparse decode attention shares between the CPU engine
// (g++) and the CUDA kernels (nvcc, attention/cuda/): which blocks are
// candidates, block bounds and centre scores from per-dimension key
// min / max, mean-key scores, the online-softmax merge, and the PSA stop rule's unseen-mass
// estimates and decision. Header-only, no dependencies beyond <cmath>:
// every function is __host__ __device__ under nvcc (PSA_HD), plain inline
// otherwise. Stateless; thread-safe.
//
// The CPU engine calls these where it computes the same thing
// (SparseAttention's stop decision and softmax rescale, StopRule::Unseen),
// so the GPU's decisions follow the same rules by construction. What stays
// engine-specific: the CPU's 8-bit bounds (BlockBounds, never below
// PsaBoxBound) and its polynomial exp (fp16_kernels.h's ExpNonPositive);
// the GPU uses expf.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_PSA_MATH_H_
#define PSA_COMPUTE_WORKER_ATTENTION_PSA_MATH_H_

#include <math.h>

#include <cmath>

#if defined(__CUDACC__)
#define PSA_HD __host__ __device__ __forceinline__
#else
#define PSA_HD inline
#endif

namespace psa {

PSA_HD int PsaMin(int a, int b) { return a < b ? a : b; }
PSA_HD int PsaMax(int a, int b) { return a > b ? a : b; }

// The sparse order as one integer (BlockRanking's order: descending score,
// ties to the lower index, NaN ranked as -inf, -0 as +0): candidate a goes
// before b exactly when PsaOrderKey(a) < PsaOrderKey(b). The device sorts
// these keys (RunBlockOrder).
PSA_HD unsigned long long PsaOrderKey(float score, int index) {
  if (!(score == score)) score = -INFINITY;
  if (score == 0.0f) score = 0.0f;
  const union {
    float f;
    unsigned int u;
  } bits = {score};
  // IEEE bits made monotone as unsigned (negatives flipped), then reversed.
  const unsigned int ascending = (bits.u & 0x80000000u) ? ~bits.u : (bits.u | 0x80000000u);
  return (static_cast<unsigned long long>(~ascending) << 32) | static_cast<unsigned int>(index);
}

// ---- Which blocks a decode row chooses among (the CPU's BlockLayout) ----

// Blocks of one row that sees positions [0, n_keys): sinks [0, sink),
// candidates [sink, local_begin), newest blocks [local_begin, n_blocks)
// (the partial tail included). Sinks and newest are always attended.
struct PsaLayout {
  int n_blocks, sink, local_begin;
  PSA_HD int n_cand() const { return local_begin - sink; }
  PSA_HD int forced() const { return sink + (n_blocks - local_begin); }
};

// full_blocks: blocks whose metadata is valid (every row committed).
PSA_HD PsaLayout PsaLayoutOf(int n_keys, int full_blocks, int block_size, int sink_blocks,
                             int local_blocks) {
  const int n_meta = PsaMin(full_blocks, n_keys / block_size);
  const int sink = PsaMin(sink_blocks, n_meta);
  return PsaLayout{(n_keys + block_size - 1) / block_size, sink,
                   PsaMax(sink, n_meta - local_blocks)};
}

// Candidates taken in order: top-k's k less the forced blocks, PSA all.
PSA_HD int PsaTake(bool topk, int top_k, const PsaLayout& lay) {
  if (!topk) return lay.n_cand();
  const int take = top_k - lay.forced();
  return take < 0 ? 0 : PsaMin(take, lay.n_cand());
}

// ---- Block scores from a block's key box [kmin, kmax] ----

// Dimension i's share of the box bound: max(q_i * kmax_i, q_i * kmin_i).
PSA_HD float PsaBoxTerm(float q, float kmax, float kmin) {
  const float a = q * kmax, b = q * kmin;
  return a > b ? a : b;
}
// Dimension i's share of the centre score: q_i * (kmax_i + kmin_i) / 2.
PSA_HD float PsaCentreTerm(float q, float kmax, float kmin) { return q * (0.5f * (kmax + kmin)); }

// scale * sum_i max(q_i * kmax_i, q_i * kmin_i): for every key k in the
// box, never below scale * q.k (each term is at least q_i * k_i, and
// rounding is monotone, so summed in the same order it stays so).
PSA_HD float PsaBoxBound(const float* q, const float* kmax, const float* kmin, int d, float scale) {
  float s = 0;
  for (int i = 0; i < d; ++i) s += PsaBoxTerm(q[i], kmax[i], kmin[i]);
  return scale * s;
}
// scale * q . (kmax + kmin) / 2: about a block's typical score.
PSA_HD float PsaCentreScore(const float* q, const float* kmax, const float* kmin, int d,
                            float scale) {
  float s = 0;
  for (int i = 0; i < d; ++i) s += PsaCentreTerm(q[i], kmax[i], kmin[i]);
  return scale * s;
}
// scale * q . (the block's mean key): its typical score, what the stop
// weighs an unseen block by. Nearer a block's log-mass than the centre
// score where a few keys stretch the box (docs/attention.md, "Stop rules").
PSA_HD float PsaMeanScore(const float* q, const float* kmean, int d, float scale) {
  float s = 0;
  for (int i = 0; i < d; ++i) s += q[i] * kmean[i];
  return scale * s;
}

// A head's rank estimate of a block's log-mass (AttentionPolicy::Rank's
// kEstimate): its centre score plus 0.4 of the box's width term (the bound
// less the centre; 1 would be the bound). Chosen on the blocks' exact
// masses (bench/rank_study.py, docs/attention.md "Ranking"): 0.1-0.4 rank
// alike on the Qwen models, 0.4-0.5 best on SmolLM2, and a block whose
// mass sits in one key (a needle) needs the width.
constexpr float kPsaRankWidth = 0.4f;
PSA_HD float PsaRankScore(float centre, float bound) {
  return centre + kPsaRankWidth * (bound - centre);
}

// The log of a rank estimate's summed shares (x >= 0), to within 0.06:
// a positive float's bits read as an integer are a piecewise-linear log2,
// exact at powers of two and, what the ranking needs, monotone. ~10x
// cheaper than logf, and the same on the CPU and the GPU. x = 0 (or NaN)
// gives -inf: ranked last.
PSA_HD float PsaShareLog(float x) {
  if (!(x > 0.0f)) return -INFINITY;
  const union {
    float f;
    int i;
  } bits = {x};
  return static_cast<float>(bits.i - 0x3f800000) * (0.693147181f / 8388608.0f);
}

// ---- Online softmax ----
// A head's state: running max m of its scores and exp-sum l in that scale
// (double: AS_acc), accumulator acc = sum exp(s - m) * v.

// When the running max rises from m to new_m, what was accumulated in the
// old scale is multiplied by this (0 on the first block: m = -inf).
PSA_HD float PsaRescale(float m, float new_m) { return expf(m - new_m); }

// Two partial states (a split of the keys, a warp's blocks) into one:
// *m, *l the merged state, *ra and *rb the factors for a's and b's
// accumulators. An empty part (m = -inf, l = 0) gets factor 0 unless both
// are empty.
PSA_HD void PsaMergeStates(float ma, double la, float mb, double lb, float* m, double* l,
                           float* ra, float* rb) {
  const float mm = ma > mb ? ma : mb;
  *ra = ma == mm ? 1.0f : expf(ma - mm);
  *rb = mb == mm ? 1.0f : expf(mb - mm);
  *m = mm;
  *l = la * *ra + lb * *rb;
}

// ---- The PSA stop rule (StopRule) ----
// A head stops once P = AS_acc / (AS_acc + unseen) >= epsilon, after at
// least min_blocks blocks. The weighted estimators weigh candidate c by
// w_c = exp(x_c - X) (x_c its mean-key score or bound, X the head's largest),
// W the total, seen_w the weight of the candidates attended.

// The unseen candidates' weight; never negative.
PSA_HD double PsaUnseenWeight(double w_total, double seen_w) {
  const double u = w_total - seen_w;
  return 0.0 < u ? u : 0.0;
}
// Estimate (the served default): the unseen blocks hold their share of the
// mean-key estimates, scaled by what the attended ones held against theirs
// (seen_sum: their exp-sum in the running scale). INFINITY while unknown.
PSA_HD double PsaUnseenEstimate(double w_unseen, double seen_w, double seen_sum) {
  return seen_w <= 0 ? INFINITY : w_unseen * (seen_sum / seen_w);
}
// Certified: each unseen block's mass is at most factor * exp(bound), in
// the running scale m (factor: the block size B; 1 when x is a block's
// exact log-mass). P is then a guaranteed lower bound.
PSA_HD double PsaUnseenCertified(double w_unseen, int factor, float w_max, float m) {
  return factor * w_unseen * exp(static_cast<double>(w_max) - m);
}
// Calibrated (research): the unseen bounds scaled by the latest
// iteration's actual / bound.
PSA_HD double PsaUnseenCalibrated(double w_unseen, double group_w, double group_sum) {
  return group_w <= 0 ? INFINITY : w_unseen * (group_sum / group_w);
}
// Whether a head that has attended `blocks` may stop at all.
PSA_HD bool PsaMayStop(int blocks, int min_blocks) { return blocks >= min_blocks; }
// The captured fraction P (0 while unseen is INFINITY).
PSA_HD double PsaCaptured(double l, double unseen) { return l / (l + unseen); }
// The decision.
PSA_HD bool PsaStops(double captured, float epsilon) { return captured >= epsilon; }

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_PSA_MATH_H_
