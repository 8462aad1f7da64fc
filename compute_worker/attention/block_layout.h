// Which blocks a sparse attention step chooses among: the always-attended
// sinks and newest blocks, the candidates between them, and how many of
// those a paged step asks for up front. Value types and stateless
// functions; thread-safe.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_BLOCK_LAYOUT_H_
#define PSA_COMPUTE_WORKER_ATTENTION_BLOCK_LAYOUT_H_

#include <vector>

#include "common/attention_policy.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/kv/kv_page_reader.h"

namespace psa {

// Where one query row's blocks fall: the sinks [0, sink), the candidates
// the policy chooses among [sink, local_begin), and the newest blocks
// [local_begin, n_blocks), the partial tail included; sinks and newest are
// always attended.
struct BlockLayout {
  int n_blocks, sink, local_begin;
  int n_cand() const { return local_begin - sink; }
  int forced() const { return sink + (n_blocks - local_begin); }
  void AppendForced(std::vector<int>* blocks) const {
    for (int b = 0; b < sink; ++b) blocks->push_back(b);
    for (int b = local_begin; b < n_blocks; ++b) blocks->push_back(b);
  }
};

// The layout for a row that sees positions [0, n_keys) of kv.
BlockLayout LayoutOf(const KvCache& kv, int n_keys, const AttentionPolicy& p);

// Candidates a paged step asks for before its first iteration: top-k's
// whole budget; PSA's budget floor, one iteration, or the budget of its
// previous step (`hint`: budgets change little between steps), the most.
int UpfrontCandidates(const AttentionPolicy& p, const BlockLayout& lay, int hint);

// PSA through a pool: a candidate the reader would have to fetch ranks as
// if its bound were resident_bias lower (gscore[c] -= resident_bias).
void BiasNonResident(const AttentionPolicy& p, const KvPageReader& reader, const BlockLayout& lay,
                     float* gscore);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_BLOCK_LAYOUT_H_
