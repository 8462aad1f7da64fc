// A Llama-family model loaded from GGUF: hyperparameters, weight views into
// the memory-mapped file, tokenizer and chat template. Immutable once loaded
// and shared by every runtime and sequence that uses it.
#ifndef PSA_COMPUTE_WORKER_MODEL_LLAMA_MODEL_H_
#define PSA_COMPUTE_WORKER_MODEL_LLAMA_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "compute_worker/model/chat_template.h"
#include "compute_worker/model/ggml_types.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/tokenizer.h"

namespace psa {

// Most query heads per KV head this runtime handles (attention kernels keep
// per-head state for a whole GQA group on the stack).
constexpr int kMaxGqaGroup = 16;

struct LlamaHparams {
  std::string architecture;  // "llama" or "qwen2"
  int n_layer = 0;
  int n_embd = 0;
  int n_ff = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_vocab = 0;
  int n_ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;
  int rope_dim = 0;  // rotated dimensions per head (== head_dim for Llama)
  // Which dimensions RoPE pairs: adjacent (x[2i], x[2i+1]) as Llama's GGUF
  // layout has them, or halves (x[i], x[i + rope_dim/2]) as Qwen2's ("NeoX").
  enum class RopeStyle { kAdjacent, kNeox };
  RopeStyle rope_style = RopeStyle::kAdjacent;
  // Rotation angle of pair i at position p: p * rope_freq_scale *
  // rope_base^(-2i/rope_dim) / rope_freq_factors[i] (factors empty: all 1).
  // Linear scaling sets the scale; Llama 3.1's "llama3" scaling ships the
  // per-pair factors as the tensor rope_freqs.weight.
  float rope_freq_scale = 1.0f;
  std::vector<float> rope_freq_factors;
  bool tied_output = false;
};

// A 2-D weight: `rows` rows of `cols` elements, each row RowBytes(type, cols).
struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
  const uint8_t* row(int64_t r) const { return data + r * row_bytes; }
};

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;
  WeightMatrix wq, wk, wv, wo;
  std::vector<float> bq, bk, bv;  // projection biases (Qwen2); empty when absent
  WeightMatrix w_gate, w_up, w_down;
};

class LlamaModel {
 public:
  // Loads a GGUF file, or a registered model by name (model_registry.h).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& name_or_path);
  // Builds from an already-opened file (takes ownership).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromGguf(std::unique_ptr<GgufFile> file);

  const LlamaHparams& hparams() const { return hp_; }
  const WeightMatrix& token_embd() const { return token_embd_; }
  const std::vector<float>& output_norm() const { return output_norm_; }
  const WeightMatrix& output() const { return output_; }
  const LayerWeights& layer(int i) const { return layers_[i]; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const ChatTemplate& chat_template() const { return chat_template_; }
  const GgufFile& file() const { return *file_; }
  std::string Describe() const;  // one line for logs

 private:
  LlamaModel() = default;
  std::unique_ptr<GgufFile> file_;
  LlamaHparams hp_;
  WeightMatrix token_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ChatTemplate chat_template_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_LLAMA_MODEL_H_
