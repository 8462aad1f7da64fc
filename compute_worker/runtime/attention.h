// The attention step of a decoder layer, behind one interface so that dense
// attention and the sparse policies (top-k, PSA) are interchangeable and can
// be compared side by side in the same engine.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_ATTENTION_H_
#define PSA_COMPUTE_WORKER_RUNTIME_ATTENTION_H_

#include <memory>
#include <string_view>

#include "compute_worker/runtime/kv_cache.h"

namespace psa {

struct AttentionShape {
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  float scale = 0;  // usually 1/sqrt(head_dim)
};

// One unit of attention work: query head `head` of `n_q` consecutive query
// rows of one sequence. Query row i is at position q_pos0 + i and attends to
// positions [0, q_pos0 + i] of `kv` (causal).
struct AttentionTask {
  const KvCache* kv = nullptr;
  int layer = 0;
  int head = 0;
  int q_pos0 = 0;
  int n_q = 0;
  const float* q = nullptr;  // row i at q + i * q_stride, RoPE applied
  int q_stride = 0;
  float* out = nullptr;      // row i at out + i * out_stride
  int out_stride = 0;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::string_view name() const = 0;
  // Must be safe to call concurrently for different tasks.
  virtual void Run(const AttentionShape& shape, const AttentionTask& task) const = 0;
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

#endif  // PSA_COMPUTE_WORKER_RUNTIME_ATTENTION_H_
