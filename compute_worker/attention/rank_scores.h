// The score sparse attention ranks a GQA group's candidate blocks by
// (AttentionPolicy::rank), from the blocks' 8-bit key boxes (BlockBounds):
//  - kBound (Quest's; psa's default): the group's largest box upper bound. One outlying key
//    widens a box in its dimensions, and the bound then ranks the block as if
//    every key sat at the box's far corner.
//  - kEstimate (top-k's default): head g's estimate of block c's log-mass,
//    r_gc = PsaRankScore(centre, bound) (the centre score plus 0.4 of the
//    width term), made head g's share of its candidates' estimated mass,
//    exp(r_gc) / sum_c' exp(r_gc'); the group's score of c is the log of
//    the sum of its heads' shares, so a diffuse head's best blocks are not
//    drowned by a peaked head's. Measured against the blocks' exact mass on
//    three models (docs/attention.md, "Ranking").
// Stateless; thread-safe (thread_local scratch).
#ifndef PSA_COMPUTE_WORKER_ATTENTION_RANK_SCORES_H_
#define PSA_COMPUTE_WORKER_ATTENTION_RANK_SCORES_H_

#include "common/attention_policy.h"
#include "compute_worker/kv/block_bounds.h"

namespace psa {

// For candidates c of blocks [first, first + n) and heads g < group:
// gscore[c] = the rank score; ub[g * n + c] = the head's box bound,
// centre[g * n + c] its centre score and mean[g * n + c] its mean-key score
// (BlockBounds::Score's) unless null.
void RankScores(const BlockBounds& bounds, AttentionPolicy::Rank rank, const float* const* qs,
                int group, float scale, int first, int n, float* ub, float* centre, float* gscore,
                float* mean = nullptr);

// kEstimate's group scores from the heads' bounds and centre scores
// ([group][n] each); r: scratch of n floats.
void EstimateGroupScores(const float* ub, const float* centre, int group, int n, float* r,
                         float* gscore);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_RANK_SCORES_H_
