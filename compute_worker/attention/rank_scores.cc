#include "compute_worker/attention/rank_scores.h"

#include <cmath>
#include <vector>

#include "compute_worker/attention/psa_math.h"
#include "compute_worker/kernels/fp16_kernels.h"

namespace psa {

void EstimateGroupScores(const float* ub, const float* centre, int group, int n, float* r,
                         float* gscore) {
  if (n <= 0) return;
  for (int c = 0; c < n; ++c) gscore[c] = 0.0f;
  for (int g = 0; g < group; ++g) {
    const float* u = ub + static_cast<size_t>(g) * n;
    const float* x = centre + static_cast<size_t>(g) * n;
    for (int c = 0; c < n; ++c) r[c] = PsaRankScore(x[c], u[c]);
    const float m = MaxF32(r, n);
    if (!std::isfinite(m)) continue;  // NaN scores (a NaN query) rank last
    const float inv = static_cast<float>(1.0 / ExpShiftSum(r, n, m));  // r[c] = exp(r[c] - m)
    for (int c = 0; c < n; ++c) gscore[c] += r[c] * inv;
  }
  // The log keeps the scale of log-mass that resident_bias subtracts in.
  for (int c = 0; c < n; ++c) gscore[c] = PsaShareLog(gscore[c]);
}

void RankScores(const BlockBounds& bounds, AttentionPolicy::Rank rank, const float* const* qs,
                int group, float scale, int first, int n, float* ub, float* centre, float* gscore,
                float* mean) {
  if (n <= 0) return;
  if (rank == AttentionPolicy::Rank::kBound) {
    bounds.Score(qs, group, scale, first, first + n, ub, n, gscore, centre, mean);
    return;
  }
  thread_local std::vector<float> own_ub, own_centre, r;
  const size_t all = static_cast<size_t>(group) * n;
  if (ub == nullptr) ub = (own_ub.resize(all), own_ub.data());
  if (centre == nullptr) centre = (own_centre.resize(all), own_centre.data());
  r.resize(n);
  bounds.Score(qs, group, scale, first, first + n, ub, n, gscore, centre, mean);
  EstimateGroupScores(ub, centre, group, n, r.data(), gscore);
}

}  // namespace psa
