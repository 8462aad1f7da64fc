// CUDA decode attention over paged KV: dense, top-k and PSA as modes of
// one kernel family, plus the selection's block scores. FlashInfer-style:
// kernels grouped by what they compute, a thin plan / run dispatch.
// Host API (g++ and nvcc compile it); the kernels are in the .cu files
// beside it. Every pointer in these structs is a device pointer.
//
// Pages are the project's (KvCache, the KV service): one page is one
// (sequence, layer, KV head, 16-token block), K[16][head_dim] then
// V[16][head_dim], fp16, 16-byte aligned. Head dims 64 and 128, GQA groups
// of 1-8 query heads per KV head.
//
//  - Dense: every block; the keys split across CTAs (split-KV) and merged.
//  - Top-k and PSA ("ordered"): one CTA per (sequence, KV head) serves its
//    whole GQA group: the sinks and newest blocks first, then the candidates
//    in a given order, `group_blocks` per iteration, merged by online
//    softmax; top-k takes the first k - forced of the order, PSA stops each
//    head with the CPU engine's rule (psa_math.h: the mean-key estimate
//    by default, certified as an option; min_blocks; share_reads), evaluated
//    on the device. Per head: blocks attended, iterations, captured mass.
//  - The order: RunBlockScores computes the block scores on the device from
//    per-block key max / min / mean, RunBlockOrder sorts them into the CPU
//    engine's order (or the caller gives one).
// Thread-compatible: concurrent calls on different streams and buffers.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_CUDA_PSA_CUDA_H_
#define PSA_COMPUTE_WORKER_ATTENTION_CUDA_PSA_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace psa::cuda {

constexpr int kPageRows = 16;  // tokens per page (KvCache::kDefaultBlockSize)

// Device-resident paged KV of one layer for a batch of sequences.
struct PagedKv {
  int n_seq = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  // Block b of sequence s, KV head h: pages[table[s * n_head_kv + h] + b].
  const uint16_t* const* pages = nullptr;
  const int* table = nullptr;    // [n_seq * n_head_kv]
  const int* seq_len = nullptr;  // [n_seq] positions attended (the query's + 1)
  // Per-dimension key max / min / mean of block b (head_dim fp16 each) at
  // [(table[s * n_head_kv + h] + b) * head_dim]; valid for full blocks.
  const uint16_t* kmax = nullptr;
  const uint16_t* kmin = nullptr;
  const uint16_t* kmean = nullptr;
};

enum class DecodeMode { kDense, kTopK, kPsa };

// The selection options of AttentionPolicy (common/attention_policy.h),
// same meaning and defaults.
struct Selection {
  float epsilon = 0.6f;
  int group_blocks = 4;
  int min_blocks = 24;
  bool certified = false;
  bool share_reads = true;
  int top_k = 64;
  int sink_blocks = 1;
  int local_blocks = 1;
  bool rank_by_bound = false;  // AttentionPolicy::rank: the estimate by default
};

// Candidates of the ordered modes and of RunBlockScores. Candidate c of
// (s, h) is block sink + c (PsaLayoutOf); n_cand per (s, h) follows from
// seq_len. Entries of (s, h) start at begin[s * n_head_kv + h] (a prefix
// sum of n_cand over (s, h), the caller's).
struct Candidates {
  const int* begin = nullptr;  // [n_seq * n_head_kv]
  // order[begin + k]: the k-th candidate to take; a permutation of
  // [0, n_cand) (top-k reads only its first k - forced).
  const int* order = nullptr;
  // PSA's stop weights' scores, [group][n_cand] from begin * group: head
  // g's mean-key score of candidate c (its bound with `certified`).
  const float* stop_x = nullptr;
};

struct DecodeOutputs {
  float* out = nullptr;         // [n_seq][n_head][head_dim]
  int* blocks = nullptr;        // optional, [n_seq][n_head]: blocks attended
  int* iterations = nullptr;    // optional: PSA iterations run (1 for dense)
  float* captured = nullptr;    // optional: PSA's estimated captured mass
                                // (1 dense and PSA reading all, -1 top-k)
};

struct DecodePlan {
  DecodeMode mode = DecodeMode::kDense;
  int n_seq = 0, n_head = 0, n_head_kv = 0, head_dim = 0;
  float scale = 0;
  Selection sel;
  int splits = 1;            // dense: CTAs per (sequence, KV head)
  int blocks_per_split = 0;  // dense: blocks each of them reads
  size_t workspace_bytes = 0;
};

// Whether the kernels are built for this shape.
bool DecodeSupported(int head_dim, int group);

// Plans a decode step: dense splits so that the grid fills sm_count
// multiprocessors at max_seq_len (sm_count <= 0: no split, one CTA per
// (sequence, KV head)). cudaErrorInvalidValue for an unsupported shape.
cudaError_t PlanDecode(DecodeMode mode, int n_seq, int n_head, int n_head_kv, int head_dim,
                       float scale, const Selection& sel, int max_seq_len, int sm_count,
                       DecodePlan* plan);

// One decode step: q [n_seq][n_head][head_dim] fp32 (RoPE applied).
// `cand` is read by the ordered modes only; `workspace` holds
// plan.workspace_bytes. Asynchronous on `stream`; returns the launch error.
cudaError_t RunDecode(const DecodePlan& plan, const PagedKv& kv, const float* q,
                      const Candidates& cand, const DecodeOutputs& out, void* workspace,
                      cudaStream_t stream);

// Block scores of every candidate: for head g of (s, h) and candidate c,
// ub[(begin * group) + g * n_cand + c] = scale * sum_i max(q_i kmax_i,
// q_i kmin_i) (PsaBoxBound), centre[same] = PsaCentreScore and mean[same]
// = PsaMeanScore (the stop's scores, Candidates::stop_x);
// gscore[begin + c] = the rank score (compute_worker/attention/
// rank_scores.h): with sel.rank_by_bound the max over the group's ub, else
// the rank estimate (log of the sum of the heads' shares of their
// PsaRankScore), which needs ub and centre (cudaErrorInvalidValue when
// null). Other outputs may be null.
// max_n_cand: the largest n_cand in the batch (the grid's size).
cudaError_t RunBlockScores(const PagedKv& kv, int n_head, float scale, const Selection& sel,
                           const float* q, const int* cand_begin, int max_n_cand, float* ub,
                           float* centre, float* mean, float* gscore, cudaStream_t stream);

// The candidates' order as the CPU engine takes them (BlockRanking, one key
// per candidate: PsaOrderKey): order[begin + k] = the k-th candidate of
// (s, h) by descending gscore[begin + c], ties to the lower c, NaN last;
// what Candidates::order wants. One CTA per (s, h) sorts its candidates'
// keys (a bitonic sort) in `workspace`, BlockOrderWorkspaceBytes() of it.
// cand_begin and max_n_cand as RunBlockScores'; n_cand per (s, h) follows
// from kv.seq_len and sel's sink and local blocks.
size_t BlockOrderWorkspaceBytes(int n_seq, int n_head_kv, int max_n_cand);
cudaError_t RunBlockOrder(const PagedKv& kv, const Selection& sel, const int* cand_begin,
                          int max_n_cand, const float* gscore, int* order, void* workspace,
                          cudaStream_t stream);

// Appends one new token's K and V rows to every (sequence, KV head): k and
// v [n_seq][n_head_kv][head_dim] fp32 (RoPE applied to k), rounded to fp16
// (as the CPU cache stores them) into row pos[s] % 16 of page
// table + pos[s] / 16. A row that completes its block also writes the
// block's kmax / kmin / kmean (laid out as PagedKv's, as RunBlockMetadata
// computes them; all three null: no metadata, some null:
// cudaErrorInvalidValue). The pages are written through kv.pages and, where `host_pages`
// (optional, [same page ids]) names another copy, through it too: a
// GpuPagePool's resident page and its host page stay equal. Does not move
// seq_len: the caller's next step attends pos[s] + 1 positions.
cudaError_t RunAppend(const PagedKv& kv, const uint16_t* const* host_pages, const int* pos,
                      const float* k, const float* v, uint16_t* kmax, uint16_t* kmin,
                      uint16_t* kmean, cudaStream_t stream);

// The metadata of every full block from its page: kmax / kmin / kmean
// (laid out as PagedKv's) = the per-dimension max / min of its 16 keys and
// their mean (the float sum in row order over 16, rounded to nearest: as
// KvCache computes it, bit for bit). max_blocks: the most full blocks of
// any sequence.
cudaError_t RunBlockMetadata(const PagedKv& kv, int max_blocks, uint16_t* kmax, uint16_t* kmin,
                             uint16_t* kmean, cudaStream_t stream);

}  // namespace psa::cuda

#endif  // PSA_COMPUTE_WORKER_ATTENTION_CUDA_PSA_CUDA_H_
