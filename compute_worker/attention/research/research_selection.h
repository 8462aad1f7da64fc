// ResearchSelection: selection variants that are never served — the
// policy syntax and the wire cannot name them; only bench/psa_accuracy and
// tests construct them (SparseAttention's second constructor argument).
// They measure what the served choices are worth (docs/attention.md):
//  - tail estimators the served estimate superseded: kMinSeen (AS_min *
//    N_left, the PSA paper's; one near-empty block stops a head early),
//    kLastGroupMean (N_left times the latest iteration's mean block mass;
//    the default before 2026-11-30), kCalibratedBound (the unseen bounds
//    scaled by the latest iteration's actual / bound);
//  - box_centre_stop: the served stop with each block weighted by its key
//    box's centre score instead of its mean key's (",boxstop"), as served
//    before 2026-12-07;
//  - oracles, the ceiling a ranking or a stop could reach: oracle_rank
//    orders blocks by their exact attention mass, oracle_stop stops psa on
//    the exact captured mass. Both score every key (more work than dense);
//    private caches only (ignored through a pool).
// A value type.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_RESEARCH_SELECTION_H_
#define PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_RESEARCH_SELECTION_H_

#include <string>

#include "common/attention_policy.h"

namespace psa {

struct ResearchSelection {
  enum class Tail { kServed, kMinSeen, kLastGroupMean, kCalibratedBound };
  Tail tail = Tail::kServed;  // kServed: the policy's own stop rule
  bool oracle_rank = false;
  bool oracle_stop = false;   // psa only
  // Group ranking by each head's own share: a candidate's score is the
  // largest over the group of ub_g(c) - log(sum_c' exp(ub_g(c'))), not of the
  // raw bound ub_g(c), so a diffuse head's best blocks are not drowned by a
  // peaked head's (",norm").
  bool normalized_rank = false;
  // The estimate stop's weights from the box centre (psa only).
  bool box_centre_stop = false;

  // What AttentionPolicy::ToString() prints for it: ",min", ",mean", ",cal",
  // ",boxstop",
  // ",oracle" (rank and, for psa, stop), ",oracle-rank", ",oracle-stop";
  // "" when it is the served selection.
  std::string Suffix(AttentionPolicy::Kind kind) const;
};

// normalized_rank's group scores: gscore[c] = max_g ub[g][c] - lse_g, lse_g
// the log-sum-exp of head g's n_cand bounds (ub is [group][n_cand]).
void NormalizedGroupScores(const float* ub, int group, int n_cand, float* gscore);

// The policy's name with the variant, e.g. "psa(eps=0.9,G=4,min)".
inline std::string VariantName(const AttentionPolicy& p, const ResearchSelection& r) {
  return p.ToString(r.Suffix(p.kind));
}

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_RESEARCH_SELECTION_H_
