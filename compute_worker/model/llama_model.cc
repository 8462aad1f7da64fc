#include "compute_worker/model/llama_model.h"

#include "compute_worker/model/model_registry.h"

#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace psa {
namespace {

absl::StatusOr<int> GetDim(const GgufFile& f, const std::string& key, int64_t max) {
  auto v = f.GetInt(key);
  if (!v.ok()) return v.status();
  if (*v <= 0 || *v > max) {
    return absl::InvalidArgumentError(absl::StrCat(key, " = ", *v, " is out of range"));
  }
  return static_cast<int>(*v);
}

absl::Status ShapeError(const GgufTensorInfo& t, const std::string& want) {
  std::string got;
  for (int64_t d : t.shape) absl::StrAppend(&got, got.empty() ? "" : " x ", d);
  return absl::InvalidArgumentError(
      absl::StrCat("tensor '", t.name, "' has shape [", got, "], expected [", want, "]"));
}

absl::StatusOr<WeightMatrix> Matrix(const GgufFile& f, const std::string& name, int64_t cols,
                                    int64_t rows) {
  const GgufTensorInfo* t = f.FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor '", name, "' is missing"));
  if (t->shape.size() != 2 || t->shape[0] != cols || t->shape[1] != rows) {
    return ShapeError(*t, absl::StrCat(cols, " x ", rows));
  }
  WeightMatrix w;
  w.type = t->type;
  w.data = t->data;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = RowBytes(t->type, cols);
  return w;
}

absl::StatusOr<std::vector<float>> Vector(const GgufFile& f, const std::string& name, int64_t n) {
  const GgufTensorInfo* t = f.FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor '", name, "' is missing"));
  if (t->shape.size() != 1 || t->shape[0] != n) return ShapeError(*t, absl::StrCat(n));
  std::vector<float> v(n);
  DequantizeRow(t->type, t->data, v.data(), n);
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& name_or_path) {
  absl::StatusOr<std::string> resolved = ResolveModelPath(name_or_path);
  if (!resolved.ok()) return resolved.status();
  const std::string& path = *resolved;
  auto file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  auto model = FromGguf(std::move(*file));
  if (!model.ok()) {
    return absl::Status(model.status().code(), absl::StrCat(path, ": ", model.status().message()));
  }
  return model;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromGguf(std::unique_ptr<GgufFile> file) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  const GgufFile& f = *file;
  LlamaHparams& hp = m->hp_;
  auto arch = f.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  hp.architecture = *arch;
  if (hp.architecture != "llama" && hp.architecture != "qwen2") {
    return absl::InvalidArgumentError(
        absl::StrCat("general.architecture '", hp.architecture,
                     "' is not supported (this runtime serves 'llama' and 'qwen2')"));
  }
  if (hp.architecture == "qwen2") hp.rope_style = LlamaHparams::RopeStyle::kNeox;
  const std::string a = hp.architecture + ".";
#define PSA_DIM(field, key, max)                       \
  {                                                    \
    auto v = GetDim(f, a + key, max);                  \
    if (!v.ok()) return v.status();                    \
    hp.field = *v;                                     \
  }
  PSA_DIM(n_layer, "block_count", 1024)
  PSA_DIM(n_embd, "embedding_length", 1 << 16)
  PSA_DIM(n_ff, "feed_forward_length", 1 << 18)
  PSA_DIM(n_head, "attention.head_count", 1024)
  PSA_DIM(n_ctx_train, "context_length", 1 << 24)
#undef PSA_DIM
  hp.n_head_kv = hp.n_head;
  if (f.Find(a + "attention.head_count_kv") != nullptr) {
    auto v = GetDim(f, a + "attention.head_count_kv", hp.n_head);
    if (!v.ok()) return v.status();
    hp.n_head_kv = *v;
  }
  if (hp.n_embd % hp.n_head != 0 || hp.n_head % hp.n_head_kv != 0 ||
      hp.n_head / hp.n_head_kv > kMaxGqaGroup) {
    return absl::InvalidArgumentError(absl::StrCat("inconsistent heads: embedding ", hp.n_embd,
                                                   ", heads ", hp.n_head, ", kv heads ",
                                                   hp.n_head_kv));
  }
  hp.head_dim = hp.n_embd / hp.n_head;
  if (hp.head_dim % 2 != 0) return absl::InvalidArgumentError("head dimension must be even");
  for (const char* key : {"attention.key_length", "attention.value_length"}) {
    if (f.Find(a + key) == nullptr) continue;
    auto v = f.GetInt(a + key);
    if (!v.ok()) return v.status();
    if (*v != hp.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(a, key, " = ", *v, " differs from the head dimension ", hp.head_dim,
                       " (embedding / heads); such models are not supported"));
    }
  }
  hp.rope_dim = hp.head_dim;
  if (f.Find(a + "rope.dimension_count") != nullptr) {
    auto v = GetDim(f, a + "rope.dimension_count", hp.head_dim);
    if (!v.ok()) return v.status();
    hp.rope_dim = *v;
  }
  if (f.Find(a + "attention.layer_norm_rms_epsilon") != nullptr) {
    auto v = f.GetFloat(a + "attention.layer_norm_rms_epsilon");
    if (!v.ok()) return v.status();
    hp.rms_eps = static_cast<float>(*v);
  }
  if (f.Find(a + "rope.freq_base") != nullptr) {
    auto v = f.GetFloat(a + "rope.freq_base");
    if (!v.ok()) return v.status();
    hp.rope_base = static_cast<float>(*v);
  }
  if (f.Find(a + "rope.scaling.type") != nullptr) {
    auto v = f.GetString(a + "rope.scaling.type");
    if (!v.ok()) return v.status();
    if (*v == "linear") {
      auto factor = f.GetFloat(a + "rope.scaling.factor");
      if (!factor.ok()) return factor.status();
      if (!(*factor >= 1.0 && *factor <= 1024.0)) {
        return absl::InvalidArgumentError(
            absl::StrCat(a, "rope.scaling.factor = ", *factor, " is out of range [1, 1024]"));
      }
      hp.rope_freq_scale = static_cast<float>(1.0 / *factor);
    } else if (*v != "none" && *v != "llama3") {  // llama3: factors in rope_freqs.weight
      return absl::InvalidArgumentError(absl::StrCat(
          a, "rope.scaling.type = '", *v, "' is not supported (none, linear and llama3 are)"));
    }
  }

  auto tok = Tokenizer::FromGguf(f);
  if (!tok.ok()) return tok.status();
  m->tokenizer_ = std::move(*tok);
  hp.n_vocab = m->tokenizer_->vocab_size();
  auto tmpl = ChatTemplate::FromGguf(f);
  if (!tmpl.ok()) return tmpl.status();
  m->chat_template_ = *tmpl;

  const int kv_dim = hp.n_head_kv * hp.head_dim;
#define PSA_ASSIGN(dst, expr)                \
  {                                          \
    auto v = (expr);                         \
    if (!v.ok()) return v.status();          \
    dst = std::move(*v);                     \
  }
  PSA_ASSIGN(m->token_embd_, Matrix(f, "token_embd.weight", hp.n_embd, hp.n_vocab));
  PSA_ASSIGN(m->output_norm_, Vector(f, "output_norm.weight", hp.n_embd));
  hp.tied_output = f.FindTensor("output.weight") == nullptr;
  if (hp.tied_output) {
    m->output_ = m->token_embd_;
  } else {
    PSA_ASSIGN(m->output_, Matrix(f, "output.weight", hp.n_embd, hp.n_vocab));
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    PSA_ASSIGN(hp.rope_freq_factors, Vector(f, "rope_freqs.weight", hp.rope_dim / 2));
    for (float x : hp.rope_freq_factors) {
      if (!(x > 0.0f && x < 1e6f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor 'rope_freqs.weight' holds ", x, "; factors must be positive"));
      }
    }
  }
  m->layers_.resize(hp.n_layer);
  for (int i = 0; i < hp.n_layer; ++i) {
    LayerWeights& l = m->layers_[i];
    const std::string p = absl::StrCat("blk.", i, ".");
    // Qwen2 adds biases to the Q, K and V projections; Llama has none.
    for (auto [bias, n, dst] : {std::tuple{"attn_q.bias", hp.n_embd, &l.bq},
                                std::tuple{"attn_k.bias", kv_dim, &l.bk},
                                std::tuple{"attn_v.bias", kv_dim, &l.bv}}) {
      if (f.FindTensor(p + bias) != nullptr) PSA_ASSIGN(*dst, Vector(f, p + bias, n));
    }
    if (f.FindTensor(p + "attn_output.bias") != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", p, "attn_output.bias': output projection biases are not "
                       "supported"));
    }
    PSA_ASSIGN(l.attn_norm, Vector(f, p + "attn_norm.weight", hp.n_embd));
    PSA_ASSIGN(l.ffn_norm, Vector(f, p + "ffn_norm.weight", hp.n_embd));
    PSA_ASSIGN(l.wq, Matrix(f, p + "attn_q.weight", hp.n_embd, hp.n_embd));
    PSA_ASSIGN(l.wk, Matrix(f, p + "attn_k.weight", hp.n_embd, kv_dim));
    PSA_ASSIGN(l.wv, Matrix(f, p + "attn_v.weight", hp.n_embd, kv_dim));
    PSA_ASSIGN(l.wo, Matrix(f, p + "attn_output.weight", hp.n_embd, hp.n_embd));
    PSA_ASSIGN(l.w_gate, Matrix(f, p + "ffn_gate.weight", hp.n_embd, hp.n_ff));
    PSA_ASSIGN(l.w_up, Matrix(f, p + "ffn_up.weight", hp.n_embd, hp.n_ff));
    PSA_ASSIGN(l.w_down, Matrix(f, p + "ffn_down.weight", hp.n_ff, hp.n_embd));
  }
#undef PSA_ASSIGN
  m->file_ = std::move(file);
  return m;
}

std::string LlamaModel::Describe() const {
  const GgufTensorInfo* q = file_->FindTensor("blk.0.attn_q.weight");
  return absl::StrFormat(
      "%s: %d layers, %d heads (%d kv), head dim %d, embd %d, ffn %d, vocab %d, ctx %d, "
      "weights %s, rope base %g",
      hp_.architecture, hp_.n_layer, hp_.n_head, hp_.n_head_kv, hp_.head_dim, hp_.n_embd,
      hp_.n_ff, hp_.n_vocab, hp_.n_ctx_train, q ? TypeName(q->type) : "?", hp_.rope_base);
}

}  // namespace psa
