#include "compute_worker/attention/research/research_selection.h"

namespace psa {

std::string ResearchSelection::Suffix(AttentionPolicy::Kind kind) const {
  if (kind == AttentionPolicy::Kind::kTopK) return oracle_rank ? ",oracle" : "";
  if (kind != AttentionPolicy::Kind::kPsa) return "";
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
