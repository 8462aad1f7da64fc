// Dense causal attention for a chunk of prompt rows (n_q > 1), tiled so
// that each block of keys (and then of values) is read once for a tile of
// query rows x every head of the GQA group while it sits in L1/L2, instead
// of once per query row.
//
// Numerics: every row gets exactly (bit for bit) the arithmetic that the
// single-row (decode) path of DenseAttention gives it: queries rounded to
// fp16, the same per-key dot-product reduction, a full-row max, the same
// exp-and-sum (double) and normalise-and-round-to-fp16 of the
// probabilities, and the value sums accumulated key by key in order. So
// chunked prefill, stepwise decode and resumed prompts stay identical.
// (Until 2026-12-07 a chunk whose first rows end before a 128-key tile and
// whose later rows reach into it skipped those later rows' keys there: the
// chaos test's concurrent prompts, chunked unlike their solo runs, caught
// it; prefill_attention_test now starts chunks across the tiles.)
#ifndef PSA_COMPUTE_WORKER_ATTENTION_PREFILL_ATTENTION_H_
#define PSA_COMPUTE_WORKER_ATTENTION_PREFILL_ATTENTION_H_

#include "compute_worker/attention/attention.h"
#include "compute_worker/kv/kv_rows.h"

namespace psa {

// Rows [0, task.n_q) of `task`: row i attends keys [0, task.q_pos0 + i] of
// keys/values (which need hold only those rows; pages may be anywhere).
// Writes task.out. Safe to call concurrently (per-thread scratch).
void TiledPrefillAttention(const AttentionShape& shape, const AttentionTask& task,
                           const KvRows& keys, const KvRows& values);

// Whether DenseAttention sends prompt chunks here (default on; off measures
// the row-at-a-time path). Process-wide; thread-safe.
void SetTiledPrefillAttentionEnabled(bool on);
bool TiledPrefillAttentionEnabled();

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_PREFILL_ATTENTION_H_
