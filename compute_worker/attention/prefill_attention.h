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
// Measured otherwise (2026-12-06): through a block pool, ctest's
// ChaosTest.EveryStreamEqualsItsSoloRunThroughRepeatsAndKills gets other
// first tokens with it than without, so DenseAttention uses it only when
// enabled (off by default) until that is found.
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

// Whether DenseAttention sends prompt chunks here (default off, see above).
// Process-wide; thread-safe.
void SetTiledPrefillAttentionEnabled(bool on);
bool TiledPrefillAttentionEnabled();

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_PREFILL_ATTENTION_H_
