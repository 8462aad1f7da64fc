#include "compute_worker/attention/research/research_selection.h"

#include <algorithm>
#include <cmath>

namespace psa {

void NormalizedGroupScores(const float* ub, int group, int n_cand, float* gscore) {
  if (n_cand <= 0) return;
  std::fill(gscore, gscore + n_cand, -INFINITY);
  for (int g = 0; g < group; ++g) {
    const float* u = ub + static_cast<size_t>(g) * n_cand;
    const float mx = *std::max_element(u, u + n_cand);
    double sum = 0;
    for (int c = 0; c < n_cand; ++c) sum += std::exp(static_cast<double>(u[c]) - mx);
    const float lse = mx + static_cast<float>(std::log(sum));
    for (int c = 0; c < n_cand; ++c) gscore[c] = std::max(gscore[c], u[c] - lse);
  }
}

std::string ResearchSelection::Suffix(AttentionPolicy::Kind kind) const {
  if (normalized_rank && !oracle_rank) {
    ResearchSelection rest = *this;
    rest.normalized_rank = false;
    return rest.Suffix(kind) + ",norm";
  }
  if (kind == AttentionPolicy::Kind::kTopK) return oracle_rank ? ",oracle" : "";
  if (kind != AttentionPolicy::Kind::kPsa) return "";
  if (box_centre_stop && !oracle_stop && tail == Tail::kServed) {
    ResearchSelection rest = *this;
    rest.box_centre_stop = false;
    return rest.Suffix(kind) + ",boxstop";
  }
  if (oracle_rank && oracle_stop) return ",oracle";
  if (oracle_rank) return ",oracle-rank";
  if (oracle_stop) return ",oracle-stop";
  switch (tail) {
    case Tail::kMinSeen: return ",min";
    case Tail::kLastGroupMean: return ",mean";
    case Tail::kCalibratedBound: return ",cal";
    case Tail::kServed: break;
  }
  return "";
}

}  // namespace psa
