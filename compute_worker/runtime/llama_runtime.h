// CPU forward pass of a Llama-family model over a batch of sequences.
//
// One Forward() call takes any mix of prompt chunks (prefill) and single
// tokens (decode) from different sequences: all their rows go through every
// weight matrix together, and attention runs per sequence against its own
// KV cache through the configured AttentionBackend. Not thread-safe: one
// runtime per thread of control; it parallelises internally (OpenMP).
#ifndef PSA_COMPUTE_WORKER_RUNTIME_LLAMA_RUNTIME_H_
#define PSA_COMPUTE_WORKER_RUNTIME_LLAMA_RUNTIME_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/attention/attention.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/kernels/matmul.h"

namespace psa {

struct RuntimeOptions {
  int threads = 0;            // 0: OpenMP default (all cores)
  int max_batch_tokens = 512; // rows per Forward() pass; longer prompts are chunked
  int max_context = 0;        // 0: the model's training context
  KvPaging paging;            // NewCache(): pages in this pool (if set), else private
};

// One sequence's part of a batch: `tokens` are appended at positions
// kv->length() onwards; logits are produced for the last token if wanted.
struct BatchEntry {
  KvCache* kv = nullptr;
  absl::Span<const TokenId> tokens;
  bool want_logits = true;
  // Attention for this entry's rows (null: the runtime's default backend).
  const AttentionBackend* attention = nullptr;
  // If set, resized to n_layer * n_head and filled with what each (layer,
  // query head) did for the entry's last token.
  std::vector<HeadStepStats>* stats = nullptr;
  // Prompt rows: attended as prompt rows (AttentionTask::prefill) however
  // few. An entry of several rows always is; one row without this is a
  // decode step. A prompt's last chunk can be one row (a prefix hit, a
  // token budget, a pass boundary), and sparse policies attend prompt and
  // decode rows differently: the output must not depend on the chunking
  // (with sparse_prefill_rows 0, the default; above it, how many prompt
  // rows share a pass decides how they are attended).
  bool prompt = false;
};

class LlamaRuntime {
 public:
  LlamaRuntime(const LlamaModel& model, RuntimeOptions options,
               std::unique_ptr<AttentionBackend> attention = nullptr);

  const LlamaModel& model() const { return model_; }
  const AttentionBackend& default_attention() const { return *attention_; }
  const RuntimeOptions& options() const { return options_; }
  int max_context() const { return max_context_; }
  // Sites (layer * n_head_kv + kv_head) whose attention tasks carry
  // AttentionTask::retrieval_head (compute_worker/runtime/retrieval_heads.h).
  // Empty (the default): none.
  // INVALID_ARGUMENT unless empty or n_layer * n_head_kv long.
  absl::Status SetRetrievalHeads(std::vector<bool> sites);
  const std::vector<bool>& retrieval_heads() const { return retrieval_heads_; }
  // An empty cache for this model (block_size 0: the default).
  KvCache NewCache(int block_size = 0) const;

  // Runs the batch. logits gets one row of n_vocab floats per entry with
  // want_logits, in entry order. Entries longer than max_batch_tokens are
  // split into several passes. INVALID_ARGUMENT (and no change to any cache)
  // for unknown token ids, empty entries, or contexts past max_context.
  absl::Status Forward(absl::Span<const BatchEntry> batch, std::vector<float>* logits);

  // Convenience: prefill one sequence, returning the last token's logits.
  absl::Status Prefill(KvCache* kv, absl::Span<const TokenId> tokens, std::vector<float>* logits);

 private:
  // One pass over at most max_batch_tokens rows.
  void ForwardPass(absl::Span<const BatchEntry> batch, float* logits);
  void EnsureRope(int positions);

  const LlamaModel& model_;
  RuntimeOptions options_;
  std::unique_ptr<AttentionBackend> attention_;
  int max_context_;
  std::vector<bool> retrieval_heads_;  // [layer * n_head_kv + kv_head]; empty: none
  // Pages fetched by all pool-backed caches when the last pass began: a pass
  // after one that fetched runs attention on more threads than cores.
  uint64_t fetches_seen_ = 0;
  // RoPE cos/sin per position and rotated pair, computed as ggml does.
  std::vector<float> rope_cos_, rope_sin_;
  int rope_positions_ = 0;
  // Scratch reused across passes.
  std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, logits_rows_;
  PackedActivations packed_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_LLAMA_RUNTIME_H_
