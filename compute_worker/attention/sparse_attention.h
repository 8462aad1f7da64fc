// Block-sparse decode attention: top-k block selection (Quest-style) and
// Progressive Sparse Attention (PSA), behind the AttentionBackend interface.
//
// Both score every full KV block with its key metadata: for query q an
// upper bound ub_j of scale * q.k over the block, from the box its keys lie
// in (BlockBounds: never below the exact box bound
// scale * sum_i max(q_i * kmax_ji, q_i * kmin_ji), above it by at most the
// rounding of 8-bit steps), and the group's rank score (rank_scores.h: by
// default the heads' shares of the estimated mass; the bound's max over the
// heads with rank=bound). One selection serves a GQA group. Sink blocks
// and the newest blocks (the partial tail included) are always attended;
// a task marked as a retrieval head's (AttentionTask::retrieval_head)
// attends every block on decode rows unless the policy says noretrieval.
//
//  - topk: the k best-scored blocks (sinks and newest count towards k).
//  - psa:  blocks in descending score, G per iteration, merged by online
//    softmax; each query head stops on its own once the captured fraction
//    P_acc = AS_acc / (AS_acc + unseen) reaches epsilon, the unseen mass
//    estimated as StopRule says (mean-key scores). With `certified`, it is bounded
//    by sum_j B * exp(ub_j - m), so P_acc is a guaranteed lower bound on the
//    captured fraction. The group reads the union of its heads' budgets.
//    Through a block pool, blocks that would have to be fetched rank
//    `resident_bias` lower (resident ones of about equal promise first).
//
// Prefill rows use dense attention unless `sparse_prefill_rows` allows a
// short prompt's rows (a question after a long stored document) to go
// through the policy one by one, each as a decode step would.
//
// The parts: block_layout (which blocks are candidates), BlockBounds and
// BlockRanking (scores, lazy ordering), StopRule (when a head stops), the
// block kernels, and the attend loop in RunQuery. Research variants
// (attention/research/) plug in through the second constructor only.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_SPARSE_ATTENTION_H_
#define PSA_COMPUTE_WORKER_ATTENTION_SPARSE_ATTENTION_H_

#include <string>

#include "absl/status/status.h"
#include "common/attention_policy.h"
#include "compute_worker/attention/attention.h"
#include "compute_worker/attention/research/research_selection.h"

namespace psa {

class SparseAttention : public AttentionBackend {
 public:
  explicit SparseAttention(const AttentionPolicy& policy) : policy_(policy) {}
  // Research variants (bench/psa_accuracy, tests): never served.
  SparseAttention(const AttentionPolicy& policy, const ResearchSelection& research)
      : policy_(policy), research_(research) {}
  std::string_view name() const override;
  std::string Describe() const override { return VariantName(policy_, research_); }
  void Run(const AttentionShape& shape, const AttentionTask& task) const override;
  // The blocks Run() asks for up front: the forced ones and the best-scored
  // candidates (top-k's k; PSA's budget floor or its previous step's
  // budget, resident ones favoured as Run() does).
  std::unique_ptr<KvPageReader> StartFetches(const AttentionShape& shape,
                                             const AttentionTask& task) const override;
  const AttentionPolicy& policy() const { return policy_; }
  const ResearchSelection& research() const { return research_; }

 private:
  void RunQuery(const AttentionShape& shape, const AttentionTask& task, int row,
                bool record) const;
  AttentionPolicy policy_;
  ResearchSelection research_;
  DenseAttention dense_;
};

// The backend for a policy: DenseAttention for kDense, else SparseAttention.
std::unique_ptr<AttentionBackend> MakeAttention(const AttentionPolicy& policy);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_SPARSE_ATTENTION_H_
