// Block-sparse decode attention: top-k block selection (Quest-style) and
// Progressive Sparse Attention (PSA), behind the AttentionBackend interface.
//
// Both score every full KV block with its key metadata: for query q an
// upper bound ub_j of scale * q.k over the block, from the box its keys lie
// in (BlockBounds: never below the exact box bound
// scale * sum_i max(q_i * kmax_ji, q_i * kmin_ji), above it by at most the
// rounding of 8-bit steps). One selection serves a
// GQA group: the group's score is the max over its query heads. Sink blocks
// and the newest blocks (the partial tail included) are always attended.
//
//  - topk: the k best-scored blocks (sinks and newest count towards k).
//  - psa:  blocks in descending score, G per iteration, merged by online
//    softmax; each query head stops on its own once the captured fraction
//    P_acc = AS_acc / (AS_acc + unseen) reaches epsilon, the unseen mass
//    estimated as TailEstimate says. With `certified`, it is instead bounded
//    by sum_j B * exp(ub_j - m), so P_acc is a guaranteed lower bound on the
//    captured fraction. The group reads the union of its heads' budgets.
//    Through a block pool, blocks that would have to be fetched rank
//    `resident_bias` lower (resident ones of about equal promise first).
//
// Prefill rows use dense attention unless `sparse_prefill_rows` allows a
// short prompt's rows (a question after a long stored document) to go
// through the policy one by one, each as a decode step would.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_SPARSE_ATTENTION_H_
#define PSA_COMPUTE_WORKER_RUNTIME_SPARSE_ATTENTION_H_

#include <string>

#include "absl/status/status.h"
#include "compute_worker/attention/attention.h"

namespace psa {

struct AttentionPolicy {
  enum class Kind { kDense, kTopK, kPsa };
  Kind kind = Kind::kPsa;
  // Defaults lean to quality (README, "Attention policies"): on the default
  // model at 8K they read ~20% of the KV with KL ~0.007 against dense.
  float epsilon = 0.9f;    // psa: target captured attention mass
  int group_blocks = 4;    // psa: blocks per progressive iteration (G)
  bool certified = false;  // psa: stop on the guaranteed bound
  // psa, uncertified: how the mass of the unseen blocks is estimated.
  //  kCentre: each unseen block's share of the centre estimates
  //    B*exp(c_j) (c_j: q . the centre of block j's key box), scaled by the
  //    mass the attended blocks turned out to hold against their estimates
  //    (ours): uses which blocks are left and calibrates on all seen so far.
  //  kMinSeen: AS_min * N_left, AS_min the smallest block exp-sum seen (the
  //    paper). One near-empty block drives it to ~0 and stops the head early.
  //  kLastGroupMean: N_left times the mean exp-sum of the latest iteration's
  //    blocks (ours, the default before kCentre).
  //  kCalibratedBound: the unseen blocks' upper bounds sum_j B*exp(ub_j),
  //    scaled by actual/bound measured on the latest iteration's blocks.
  // bench/psa_accuracy compares them.
  enum class TailEstimate { kCentre, kMinSeen, kLastGroupMean, kCalibratedBound };
  TailEstimate tail = TailEstimate::kCentre;
  int min_blocks = 24;     // psa: no head stops before attending this many blocks
  // psa, GQA: a head that has stopped still attends the blocks its group
  // reads on for its other heads (the bytes are read anyway: the group's
  // reads are the union of its heads' budgets). Off (",solo"): it stops
  // attending, as in the paper.
  bool share_reads = true;
  // psa through a block pool: a block that is not resident (would have to
  // be fetched) ranks as if its bound were this much lower (natural-log
  // units of attention mass: 2 = e^2 ~ 7x less), so resident blocks of
  // about equal promise are read first and the fetch may never be needed.
  // The stop rule is unchanged. 0: rank by the bound alone.
  float resident_bias = 2.0f;
  // Research only (bench/psa_accuracy --oracle), never served: the ceiling
  // a ranking and a stop rule could reach, each on its own. Both cost more
  // than dense (every key's score); private caches only (ignored for
  // pool-backed ones).
  //  oracle_rank: blocks ranked by their exact attention mass instead of
  //    the metadata bound.
  //  oracle_stop: psa stops on the exact captured mass (the certified stop
  //    with each block's exact mass in place of its bound).
  bool oracle_rank = false;
  bool oracle_stop = false;
  int top_k = 64;          // topk: blocks attended per step
  // Prefill rows of a sequence, at most this many in a pass, select as
  // decode steps do instead of reading every block: the question after a
  // stored document then reads (and, through a pool, fetches) what decode
  // would, not the whole document. Rows past that are attended densely.
  // 0 (the default): prefill always dense. Measured (README, "Benchmarks"):
  // 2x fewer bytes fetched per token and 2x shorter time to first token,
  // but the answers leave dense's greedy tokens much sooner (the question's
  // keys and values are approximate, and every later step reads them).
  int sparse_prefill_rows = 0;
  int sink_blocks = 1;     // always attended: the first blocks ...
  int local_blocks = 1;    // ... and the newest full blocks (plus the partial tail)

  absl::Status Validate() const;  // INVALID_ARGUMENT naming the bad field
  std::string ToString() const;   // e.g. "psa(eps=0.95,G=4)"
};

class SparseAttention : public AttentionBackend {
 public:
  explicit SparseAttention(const AttentionPolicy& policy) : policy_(policy) {}
  std::string_view name() const override;
  void Run(const AttentionShape& shape, const AttentionTask& task) const override;
  // The blocks Run() asks for up front: the forced ones and the best-scored
  // candidates (top-k's k; PSA's budget floor or its previous step's
  // budget, resident ones favoured as Run() does).
  std::unique_ptr<KvPageReader> StartFetches(const AttentionShape& shape,
                                             const AttentionTask& task) const override;
  const AttentionPolicy& policy() const { return policy_; }

 private:
  void RunQuery(const AttentionShape& shape, const AttentionTask& task, int row,
                bool record) const;
  AttentionPolicy policy_;
  DenseAttention dense_;
};

// The backend for a policy: DenseAttention for kDense, else SparseAttention.
std::unique_ptr<AttentionBackend> MakeAttention(const AttentionPolicy& policy);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_SPARSE_ATTENTION_H_
