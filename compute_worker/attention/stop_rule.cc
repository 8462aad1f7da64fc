#include "compute_worker/attention/stop_rule.h"

#include <algorithm>
#include <cmath>

#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/fp16_kernels.h"

namespace psa {

StopRule::StopRule(const AttentionPolicy& p, ResearchSelection::Tail tail, bool exact_stop)
    : tail_(tail),
      exact_(exact_stop),
      // An exact stop is the certified one with exact block masses. Top-k
      // has no stop: no weights either.
      certified_(p.kind == AttentionPolicy::Kind::kPsa && (p.certified || exact_stop)),
      calibrated_(p.kind == AttentionPolicy::Kind::kPsa && !certified_ &&
                  tail == ResearchSelection::Tail::kCalibratedBound),
      estimate_(p.kind == AttentionPolicy::Kind::kPsa && !certified_ &&
              tail == ResearchSelection::Tail::kServed) {}

void StopRule::Weigh(float* x, int group, int n_cand) {
  w_ = x;
  n_cand_ = n_cand;
  for (int g = 0; g < group; ++g) {
    float* w = x + static_cast<size_t>(g) * n_cand;
    w_max_[g] = MaxF32(w, n_cand);
    w_total_[g] = n_cand > 0 ? ExpShiftSum(w, n_cand, w_max_[g]) : 0.0;
  }
}

double StopRule::Unseen(const HeadState& h, int g, int left, int B) const {
  if (certified_ || calibrated_ || estimate_) {
    // The estimates are psa_math.h's, shared with the CUDA kernels.
    const double w_unseen = PsaUnseenWeight(w_total_[g], h.seen_w);
    if (certified_) {
      // Each unseen block's mass is at most B * exp(bound) (the exact
      // stop's x is a block's exact log-mass: no factor B).
      return PsaUnseenCertified(w_unseen, exact_ ? 1 : B, w_max_[g], h.m);
    }
    if (calibrated_) {
      // The unseen blocks' bounds, scaled by how tight the bounds were on
      // the latest iteration's blocks (actual / bound).
      return PsaUnseenCalibrated(w_unseen, h.group_w, h.group_sum);
    }
    // Estimate: the unseen blocks hold their share of the estimates,
    // scaled by the mass the attended blocks turned out to hold.
    return PsaUnseenEstimate(w_unseen, h.seen_w, h.seen_sum);
  }
  if (tail_ == ResearchSelection::Tail::kMinSeen) {
    return std::isinf(h.as_min) ? INFINITY : h.as_min * left;
  }
  // Blocks come in descending criticality: the latest iteration's mean
  // block mass is the estimate for each block still unseen.
  return h.group_n == 0 ? INFINITY : h.group_sum / h.group_n * left;
}

}  // namespace psa
