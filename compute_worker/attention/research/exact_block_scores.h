// Research only (bench/psa_accuracy --oracle; AttentionPolicy::oracle_rank
// and oracle_stop), never served: each candidate block's exact log-mass
// from every key, the ceiling a ranking or a stop rule could reach. Costs
// more than dense attention. Private (unpooled) caches only. Stateless.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_EXACT_BLOCK_SCORES_H_
#define PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_EXACT_BLOCK_SCORES_H_

#include "compute_worker/kv/kv_cache.h"

namespace psa {

// ub[g * n_cand + c]: log(sum_t exp(scale * q_g . k_t)) over the keys of
// block first_block + c; gscore[c]: its max over the group. The same
// outputs as BlockBounds::Score, exact instead of bounds.
void ExactBlockScores(const KvCache& kv, int layer, int kv_head, int first_block, int n_cand,
                      const float* const* qs, int group, int d, float scale, float* ub,
                      float* gscore);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_RESEARCH_EXACT_BLOCK_SCORES_H_
