// StopRule: when a PSA head has captured enough attention mass. A head
// stops once P = AS_acc / (AS_acc + unseen) reaches epsilon; the rule is
// how the mass of the candidates not yet attended ("unseen") is sized, as
// the policy's `certified` and, for research, ResearchSelection::Tail choose:
//  - estimate (served default): each unseen block's share of the mean-key
//    estimates exp(q.mean), scaled by what the attended blocks held against
//    theirs (ResearchSelection::box_centre_stop: the box centre's instead,
//    served before 2026-12-07);
//  - certified: the unseen blocks' upper bounds (P is then guaranteed);
//  - research variants (ResearchSelection::Tail): calibrated (the unseen
//    bounds scaled by the latest iteration's actual / bound), min-seen (the
//    paper) and last-group-mean (block counts times a seen block's mass).
// The weighted rules (estimate, certified, calibrated) weigh candidate c by
// w_c = exp(x_c - X) — x its mean-key (or centre) score or bound, X the
// head's largest —
// so the unseen weight is the total minus that attended.
// One per step and task; not thread-safe.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_STOP_RULE_H_
#define PSA_COMPUTE_WORKER_ATTENTION_STOP_RULE_H_

#include <cstddef>

#include "common/attention_policy.h"
#include "compute_worker/attention/head_state.h"
#include "compute_worker/attention/research/research_selection.h"
#include "compute_worker/model/llama_model.h"  // kMaxGqaGroup

namespace psa {

class StopRule {
 public:
  // `tail`: a research variant's estimator, or kServed. `exact_stop`: the
  // research oracle's stop (bounds replaced by each block's exact
  // log-mass, hence no factor B).
  StopRule(const AttentionPolicy& p, ResearchSelection::Tail tail, bool exact_stop);

  // What BlockBounds::Score must fill for it: per-head bounds, estimate
  // scores (mean-key or centre, as the caller's research variant says).
  bool wants_bounds() const { return (certified_ || calibrated_) && !exact_; }
  bool wants_estimate() const { return estimate_; }
  bool weighted() const { return certified_ || calibrated_ || estimate_; }
  bool estimate() const { return estimate_; }

  // Weighted rules: x is [group][n_cand] of bounds, exact log-masses or
  // estimate scores; they become the weights, in place (x is not read again).
  void Weigh(float* x, int group, int n_cand);
  float weight(int g, int c) const { return w_[static_cast<size_t>(g) * n_cand_ + c]; }
  const float* weights(int g) const { return w_ + static_cast<size_t>(g) * n_cand_; }

  // The unseen mass of head g (state h, `left` candidates not attended,
  // block size B), in h's running scale; INFINITY while unknown.
  double Unseen(const HeadState& h, int g, int left, int B) const;

 private:
  ResearchSelection::Tail tail_;
  bool exact_, certified_, calibrated_, estimate_;
  float* w_ = nullptr;
  int n_cand_ = 0;
  double w_total_[kMaxGqaGroup];
  float w_max_[kMaxGqaGroup];
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_STOP_RULE_H_
