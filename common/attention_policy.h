// AttentionPolicy: which decode attention a sequence gets (dense, top-k
// blocks, or Progressive Sparse Attention) and its options — the one type
// every binary, bench and the worker's gRPC service use, with the one parser
// of its text syntax. The proto form (psa.v1.AttentionPolicy) converts in
// api/attention_policy_proto.h. A value type: copy freely, no threads.
#ifndef PSA_COMMON_ATTENTION_POLICY_H_
#define PSA_COMMON_ATTENTION_POLICY_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace psa {

struct AttentionPolicy {
  enum class Kind { kDense, kTopK, kPsa };
  Kind kind = Kind::kPsa;
  // Defaults (docs/attention.md, "Defaults"): chosen on the main job's model
  // (Qwen2.5-Coder-1.5B) to read at most 1/8 of the KV at 16K: there, on
  // held-out essays, 10.5% of it at KL 0.020 against dense, where top-k
  // reading 12.5% has KL 0.031.
  float epsilon = 0.6f;    // psa: target captured attention mass
  int group_blocks = 4;    // psa: blocks per progressive iteration (G)
  bool certified = false;  // psa: stop on the guaranteed bound
  // psa, uncertified: the unseen blocks' mass is estimated from their
  // mean-key scores exp(q . mu_j) (mu_j: block j's mean key), scaled by the
  // mass the attended blocks held against theirs (StopRule).
  // Other estimators are research variants (attention/research/).
  int min_blocks = 24;     // psa: no head stops before attending this many blocks
  // psa, GQA: a head that has stopped still attends the blocks its group
  // reads on for its other heads (the bytes are read anyway: the group's
  // reads are the union of its heads' budgets). Off (",solo"): it stops
  // attending, as in the paper.
  bool share_reads = true;
  // psa through a block pool: a block that is not resident (would have to
  // be fetched) ranks as if its rank score were this much lower (natural-log
  // units of attention mass: 2 = e^2 ~ 7x less), so resident blocks of
  // about equal promise are read first and the fetch may never be needed.
  // The stop rule is unchanged. 0 (the default): rank by the score alone.
  // Opt-in and NOT deterministic: which blocks are attended, and so the
  // output, then depends on what the pool happens to hold (other requests,
  // the pool's history); measured: 23% fewer fetches for ~5% more KL.
  float resident_bias = 0.0f;
  int top_k = 64;          // topk: blocks attended per step
  // The order top-k and psa take candidate blocks in (docs/attention.md,
  // "Ranking"). kEstimate (both kinds' default): each head's estimate of a
  // block's attention mass, from its key box's centre and 0.4 of its width,
  // as that head's share of its candidates' estimated mass, summed over the
  // GQA group; top-k needs 1.1-1.7x fewer blocks with it for the same KL,
  // and PSA with it reads 1.4x fewer than top-k (Qwen2.5-Coder-1.5B, 16K).
  // Its rare large misses are retrieval heads (retrieval_dense below).
  // kBound: the group's largest box upper bound, Quest's ranking; a few
  // outlying keys widen a box and rank its block high whatever the rest
  // hold. Both kinds default to the estimate.
  enum class Rank { kEstimate, kBound };
  Rank rank = Rank::kEstimate;
  // "estimate" or "bound"; INVALID_ARGUMENT naming the value otherwise.
  static absl::StatusOr<Rank> ParseRank(absl::string_view name);
  // Prefill rows of a sequence, at most this many in a pass, select as
  // decode steps do instead of reading every block: the question after a
  // stored document then reads (and, through a pool, fetches) what decode
  // would, not the whole document. Rows past that are attended densely.
  // 0 (the default): prefill always dense. Measured (bench/README.md, "Sparse prefill"):
  // 2x fewer bytes fetched per token and 2x shorter time to first token,
  // but the answers leave dense's greedy tokens much sooner (the question's
  // keys and values are approximate, and every later step reads them).
  int sparse_prefill_rows = 0;
  // topk and psa: the (layer, KV head) sites the runtime marks as retrieval
  // heads that block ranking misses (the model registry's, or
  // --retrieval_heads; AttentionTask::retrieval_head,
  // compute_worker/runtime/retrieval_heads.h) attend every block on decode
  // rows. Off (",noretrieval"): they select as the others.
  bool retrieval_dense = true;
  int sink_blocks = 1;     // always attended: the first blocks ...
  int local_blocks = 1;    // ... and the newest full blocks (plus the partial tail)

  absl::Status Validate() const;  // INVALID_ARGUMENT naming the bad field
  // The exact form Parse() reads back, e.g. "psa(eps=0.95,G=4)": kind, then
  // the options that differ from "none" (min_blocks 0, shared reads, ...).
  // `variant`: a research variant's suffix (ResearchSelection::Suffix),
  // printed where the stop rule is named; Parse() does not read it.
  std::string ToString(absl::string_view variant = "") const;

  // The one parser of the policy syntax every binary and bench accepts
  // (docs/attention.md):
  //   KIND                   dense | topk | psa: `base` with that kind
  //   KIND:OPT,OPT...        `base` with that kind and those options
  //   KIND(OPT,OPT...)       exactly the policy ToString() printed: options
  //                          not named take their "none" value, not base's
  // OPT: eps=X  G=N  min_blocks=N  k=N  rb=X (resident_bias)  prefill=N
  //      sink=N  local=N  rank=estimate|bound (printed where not the
  //      kind's default)  certified  solo  noretrieval
  // A bare number after "psa:" is eps, after "topk:" k. Does not Validate()
  // (callers that send the policy elsewhere may leave fields unset).
  static absl::StatusOr<AttentionPolicy> Parse(absl::string_view spec,
                                               const AttentionPolicy& base);
  static absl::StatusOr<AttentionPolicy> Parse(absl::string_view spec) {
    return Parse(spec, AttentionPolicy{});
  }
  // A comma-separated list of policies, e.g. "dense,topk:k=128,psa:eps=0.95,
  // min_blocks=16": a word naming a kind starts the next policy. `texts`,
  // if given, receives each policy's own text ("topk:k=128").
  static absl::StatusOr<std::vector<AttentionPolicy>> ParseList(
      absl::string_view specs, const AttentionPolicy& base,
      std::vector<std::string>* texts = nullptr);
  bool operator==(const AttentionPolicy& o) const;
  bool operator!=(const AttentionPolicy& o) const { return !(*this == o); }
};

}  // namespace psa

#endif  // PSA_COMMON_ATTENTION_POLICY_H_
