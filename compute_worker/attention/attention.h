// The attention step of a decoder layer, behind one interface so that dense
// attention and the sparse policies (top-k, PSA) are interchangeable and are
// compared side by side in the same engine.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_ATTENTION_H_
#define PSA_COMPUTE_WORKER_ATTENTION_ATTENTION_H_

#include <memory>
#include <string>
#include <string_view>

#include "compute_worker/kv/kv_cache.h"

namespace psa {

class KvPageReader;

struct AttentionShape {
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  float scale = 0;  // usually 1/sqrt(head_dim)
  int group() const { return n_head / n_head_kv; }
};

// What one query head did in one decode step (sparse policies fill it).
struct HeadStepStats {
  int blocks_touched = 0;  // blocks whose keys and values were read
  int blocks_total = 0;    // blocks in the context (the last may be partial)
  int iterations = 0;      // PSA: progressive iterations run
  float captured = 0;      // PSA: estimated attention mass captured (1 for dense)
};

// One unit of attention work: the query heads of one KV head (its GQA group)
// for n_q consecutive query rows of one sequence. Query row i is at position
// q_pos0 + i and attends to positions [0, q_pos0 + i] of `kv` (causal).
struct AttentionTask {
  // Non-const: through a pool, the step's reader updates the page table of
  // (layer, kv_head) and the read hint; no other task touches those.
  KvCache* kv = nullptr;
  int layer = 0;
  int kv_head = 0;
  int q_pos0 = 0;
  int n_q = 0;
  // Rows the sequence has in this forward pass (1 when decoding); its tasks
  // may each hold a part of them.
  int entry_rows = 1;
  // The rows are prompt rows (BatchEntry::prompt), however few: sparse
  // policies attend them as prefill, not as decode steps.
  bool prefill = false;
  // The runtime's retrieval-head probe marked this (layer, KV head)
  // (compute_worker/runtime/retrieval_heads.h): sparse policies attend its
  // decode rows densely unless the policy says otherwise.
  bool retrieval_head = false;
  // Query head g of the group, row i: q + i * q_stride + g * head_dim
  // (RoPE applied); outputs likewise.
  const float* q = nullptr;
  int q_stride = 0;
  float* out = nullptr;
  int out_stride = 0;
  // Optional, one entry per head of the group: stats of the last query row.
  HeadStepStats* stats = nullptr;
  // Optional: the reader StartFetches() returned for this task.
  KvPageReader* reader = nullptr;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::string_view name() const = 0;
  // The full policy, e.g. "psa(eps=0.9,G=4,min_blocks=24)"; name() by default.
  virtual std::string Describe() const { return std::string(name()); }
  // Must be safe to call concurrently for different tasks.
  virtual void Run(const AttentionShape& shape, const AttentionTask& task) const = 0;
  // For a task on a pool-backed cache: starts fetching the pages Run()
  // would ask for before it computes anything and returns the reader
  // holding them, for Run() to use (task.reader). The runtime calls it for
  // all of a layer's tasks first, so every task's transfers overlap the
  // computation of the tasks before it. Null (the default; the sparse
  // policies' prefill rows): Run() fetches on its own. Safe to call
  // concurrently for different tasks.
  virtual std::unique_ptr<KvPageReader> StartFetches(const AttentionShape& shape,
                                                     const AttentionTask& task) const;
};

// Exact softmax attention over every past position. Numerics follow
// llama.cpp's non-flash CPU path (query and probabilities rounded to fp16
// before their products with the fp16 cache) so outputs agree closely.
class DenseAttention : public AttentionBackend {
 public:
  std::string_view name() const override { return "dense"; }
  void Run(const AttentionShape& shape, const AttentionTask& task) const override;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_ATTENTION_H_
