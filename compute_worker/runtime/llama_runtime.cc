#include "compute_worker/runtime/llama_runtime.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "compute_worker/kv/kv_page_reader.h"

namespace psa {
namespace {

void RmsNorm(const float* x, const float* weight, float* out, int n, float eps) {
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float scale = 1.0f / std::sqrt(static_cast<float>(sum / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = (x[i] * scale) * weight[i];
}

// Rotates pair i of each head by angle i: adjacent pairs (x[2i], x[2i+1]) as
// in Llama's GGUF layout, or halves (x[i], x[i + rope_dim/2]) for NeoX style.
void Rope(float* x, int n_heads, int head_dim, int rope_dim, LlamaHparams::RopeStyle style,
          const float* cos, const float* sin) {
  const int half = rope_dim / 2;
  const int stride = style == LlamaHparams::RopeStyle::kNeox ? 1 : 2;
  const int partner = style == LlamaHparams::RopeStyle::kNeox ? half : 1;
  for (int h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    for (int i = 0; i < half; ++i) {
      float& a = v[i * stride];
      float& b = v[i * stride + partner];
      const float a0 = a, b0 = b;
      a = a0 * cos[i] - b0 * sin[i];
      b = a0 * sin[i] + b0 * cos[i];
    }
  }
}

void AddBias(float* y, const std::vector<float>& bias, int n_rows, int ld) {
  if (bias.empty()) return;
  for (int r = 0; r < n_rows; ++r) {
    float* row = y + static_cast<size_t>(r) * ld;
    for (size_t i = 0; i < bias.size(); ++i) row[i] += bias[i];
  }
}

}  // namespace

absl::Status LlamaRuntime::SetRetrievalHeads(std::vector<bool> sites) {
  const size_t n = static_cast<size_t>(model_.hparams().n_layer) * model_.hparams().n_head_kv;
  if (!sites.empty() && sites.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval heads: ", sites.size(),
                                                   " sites given, the model has ", n));
  }
  retrieval_heads_ = std::move(sites);
  return absl::OkStatus();
}

LlamaRuntime::LlamaRuntime(const LlamaModel& model, RuntimeOptions options,
                           std::unique_ptr<AttentionBackend> attention)
    : model_(model), options_(options), attention_(std::move(attention)) {
  if (!attention_) attention_ = std::make_unique<DenseAttention>();
  if (options_.threads > 0) omp_set_num_threads(options_.threads);
  if (options_.max_batch_tokens <= 0) options_.max_batch_tokens = 512;
  max_context_ = options_.max_context > 0 ? options_.max_context : model.hparams().n_ctx_train;
}

KvCache LlamaRuntime::NewCache(int block_size) const {
  const LlamaHparams& hp = model_.hparams();
  if (options_.paging.pool != nullptr) {
    return KvCache(hp.n_layer, hp.n_head_kv, hp.head_dim,
                   block_size > 0 ? block_size : KvCache::kDefaultBlockSize, options_.paging);
  }
  return KvCache(hp.n_layer, hp.n_head_kv, hp.head_dim, block_size);
}

void LlamaRuntime::EnsureRope(int positions) {
  const LlamaHparams& hp = model_.hparams();
  if (positions <= rope_positions_) return;
  const int half = hp.rope_dim / 2;
  const int n = std::max(positions, std::min(max_context_, rope_positions_ * 2 + 256));
  rope_cos_.resize(static_cast<size_t>(n) * half);
  rope_sin_.resize(static_cast<size_t>(n) * half);
  const float theta_scale = std::pow(hp.rope_base, -2.0f / hp.rope_dim);
  for (int p = rope_positions_; p < n; ++p) {
    float theta = static_cast<float>(p) * hp.rope_freq_scale;
    for (int i = 0; i < half; ++i) {
      const float t =
          hp.rope_freq_factors.empty() ? theta : theta / hp.rope_freq_factors[i];
      rope_cos_[static_cast<size_t>(p) * half + i] = std::cos(t);
      rope_sin_[static_cast<size_t>(p) * half + i] = std::sin(t);
      theta *= theta_scale;
    }
  }
  rope_positions_ = n;
}

absl::Status LlamaRuntime::Forward(absl::Span<const BatchEntry> batch, std::vector<float>* logits) {
  const LlamaHparams& hp = model_.hparams();
  absl::flat_hash_set<const KvCache*> seen;
  int n_logits = 0;
  for (size_t e = 0; e < batch.size(); ++e) {
    const BatchEntry& b = batch[e];
    if (b.kv == nullptr || b.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("batch entry ", e, " has no cache or no tokens"));
    }
    if (b.kv->n_layer() != hp.n_layer || b.kv->n_head_kv() != hp.n_head_kv ||
        b.kv->head_dim() != hp.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch entry ", e, ": KV cache shape does not match the model"));
    }
    if (!seen.insert(b.kv).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch entry ", e, ": a sequence appears twice in one batch"));
    }
    if (b.kv->length() + static_cast<int64_t>(b.tokens.size()) > max_context_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch entry ", e, ": context would grow to ", b.kv->length() + b.tokens.size(),
          " tokens, over the limit of ", max_context_));
    }
    for (TokenId t : b.tokens) {
      if (t < 0 || t >= hp.n_vocab) {
        return absl::InvalidArgumentError(absl::StrCat("batch entry ", e, ": token id ", t,
                                                       " is outside the vocabulary (0..",
                                                       hp.n_vocab - 1, ")"));
      }
    }
    if (b.want_logits) ++n_logits;
  }
  logits->assign(static_cast<size_t>(n_logits) * hp.n_vocab, 0.0f);

  // Split into passes of at most max_batch_tokens rows; an entry's logits
  // come from the pass holding its last token.
  std::vector<BatchEntry> pass;
  std::vector<size_t> consumed(batch.size(), 0);
  int budget = options_.max_batch_tokens;
  float* out = logits->data();
  auto flush = [&]() {
    if (pass.empty()) return;
    int pass_logits = 0;
    for (const BatchEntry& b : pass) pass_logits += b.want_logits;
    ForwardPass(pass, out);
    out += static_cast<size_t>(pass_logits) * hp.n_vocab;
    pass.clear();
    budget = options_.max_batch_tokens;
  };
  for (size_t e = 0; e < batch.size(); ++e) {
    const BatchEntry& b = batch[e];
    while (consumed[e] < b.tokens.size()) {
      if (budget == 0) flush();
      const size_t take = std::min<size_t>(budget, b.tokens.size() - consumed[e]);
      BatchEntry part;
      part.kv = b.kv;
      part.tokens = b.tokens.subspan(consumed[e], take);
      consumed[e] += take;
      part.want_logits = b.want_logits && consumed[e] == b.tokens.size();
      part.attention = b.attention;
      part.stats = consumed[e] == b.tokens.size() ? b.stats : nullptr;
      // Prompt rows stay prompt rows in every part: a pass may leave one row.
      part.prompt = b.prompt || b.tokens.size() > 1;
      pass.push_back(part);
      budget -= static_cast<int>(take);
      // A sequence can appear only once per pass: its next chunk needs this
      // chunk's keys committed first.
      if (consumed[e] < b.tokens.size()) flush();
    }
  }
  flush();
  return absl::OkStatus();
}

absl::Status LlamaRuntime::Prefill(KvCache* kv, absl::Span<const TokenId> tokens,
                                   std::vector<float>* logits) {
  BatchEntry e;
  e.kv = kv;
  e.tokens = tokens;
  e.prompt = true;
  return Forward({&e, 1}, logits);
}

void LlamaRuntime::ForwardPass(absl::Span<const BatchEntry> batch, float* logits) {
  const LlamaHparams& hp = model_.hparams();
  const int E = hp.n_embd, D = hp.head_dim, KVD = hp.n_head_kv * D, F = hp.n_ff;
  // Row layout: entries' tokens back to back.
  std::vector<int> row_pos, row_entry, logit_rows;
  for (size_t e = 0; e < batch.size(); ++e) {
    const int p0 = batch[e].kv->length();
    for (size_t i = 0; i < batch[e].tokens.size(); ++i) {
      row_pos.push_back(p0 + static_cast<int>(i));
      row_entry.push_back(static_cast<int>(e));
    }
    if (batch[e].want_logits) logit_rows.push_back(static_cast<int>(row_pos.size()) - 1);
    batch[e].kv->Reserve(p0 + static_cast<int>(batch[e].tokens.size()));
  }
  const int n = static_cast<int>(row_pos.size());
  EnsureRope(*std::max_element(row_pos.begin(), row_pos.end()) + 1);
  x_.resize(static_cast<size_t>(n) * E);
  xn_.resize(static_cast<size_t>(n) * E);
  q_.resize(static_cast<size_t>(n) * E);
  k_.resize(static_cast<size_t>(n) * KVD);
  v_.resize(static_cast<size_t>(n) * KVD);
  attn_.resize(static_cast<size_t>(n) * E);
  gate_.resize(static_cast<size_t>(n) * F);
  up_.resize(static_cast<size_t>(n) * F);

  {
    int r = 0;
    for (const BatchEntry& b : batch) {
      for (TokenId t : b.tokens) {
        DequantizeRow(model_.token_embd().type, model_.token_embd().row(t), &x_[r * E], E);
        ++r;
      }
    }
  }
  const AttentionShape shape{hp.n_head, hp.n_head_kv, D, 1.0f / std::sqrt(static_cast<float>(D))};
  const int half = hp.rope_dim / 2;

  // Attention work items: (entry, KV head, chunk of query rows). The last
  // chunk of an entry holds its last token, whose stats are recorded.
  struct Item {
    int entry, kv_head, row0, n_q;
    bool last;
  };
  std::vector<Item> items;
  bool any_paged = false;
  bool fetching = false;  // since the last pass
  if (const KvPagingCounters* c = options_.paging.counters) {
    const uint64_t f = c->page_fetches.load(std::memory_order_relaxed);
    fetching = f != fetches_seen_;
    fetches_seen_ = f;
  }
  {
    int row = 0;
    for (size_t e = 0; e < batch.size(); ++e) {
      const int len = static_cast<int>(batch[e].tokens.size());
      // A pool-backed cache's (layer, head) is read by one KvPageReader at a
      // time: one item per head, however many rows.
      const bool paged = batch[e].kv->paged();
      any_paged = any_paged || paged;
      const int kQueryChunk = paged ? std::max(len, 1) : 32;
      for (int c = 0; c < len; c += kQueryChunk) {
        for (int h = 0; h < hp.n_head_kv; ++h) {
          items.push_back({static_cast<int>(e), h, row + c, std::min(kQueryChunk, len - c),
                           c + kQueryChunk >= len});
        }
      }
      if (batch[e].stats != nullptr) {
        batch[e].stats->assign(static_cast<size_t>(hp.n_layer) * hp.n_head, HeadStepStats{});
      }
      row += len;
    }
  }
  const int group = hp.n_head / hp.n_head_kv;
  std::vector<std::unique_ptr<KvPageReader>> readers(items.size());  // per item, see below

  for (int l = 0; l < hp.n_layer; ++l) {
    const LayerWeights& w = model_.layer(l);
#pragma omp parallel for schedule(static) if (n > 8)
    for (int r = 0; r < n; ++r) RmsNorm(&x_[r * E], w.attn_norm.data(), &xn_[r * E], E, hp.rms_eps);

    PackActivations(w.wq.type, xn_.data(), n, E, E, &packed_);
    MatMul(w.wq, packed_, q_.data(), E);
    if (ActivationTypeFor(w.wk.type) != ActivationTypeFor(w.wq.type)) {
      PackActivations(w.wk.type, xn_.data(), n, E, E, &packed_);
    }
    MatMul(w.wk, packed_, k_.data(), KVD);
    if (ActivationTypeFor(w.wv.type) != ActivationTypeFor(w.wk.type)) {
      PackActivations(w.wv.type, xn_.data(), n, E, E, &packed_);
    }
    MatMul(w.wv, packed_, v_.data(), KVD);
    AddBias(q_.data(), w.bq, n, E);
    AddBias(k_.data(), w.bk, n, KVD);
    AddBias(v_.data(), w.bv, n, KVD);

#pragma omp parallel for schedule(static) if (n > 8)
    for (int r = 0; r < n; ++r) {
      const float* c = &rope_cos_[static_cast<size_t>(row_pos[r]) * half];
      const float* s = &rope_sin_[static_cast<size_t>(row_pos[r]) * half];
      Rope(&q_[r * E], hp.n_head, D, hp.rope_dim, hp.rope_style, c, s);
      Rope(&k_[r * KVD], hp.n_head_kv, D, hp.rope_dim, hp.rope_style, c, s);
      KvCache* kv = batch[row_entry[r]].kv;
      for (int h = 0; h < hp.n_head_kv; ++h) {
        QuantizeRow(GgmlType::kF16, &k_[r * KVD + h * D], kv->KeySlot(l, h, row_pos[r]), D);
        QuantizeRow(GgmlType::kF16, &v_[r * KVD + h * D], kv->ValueSlot(l, h, row_pos[r]), D);
      }
    }

    // Attention over pool-backed caches that are fetching pages waits for
    // them: more threads than cores keep the cores busy meanwhile. (When the
    // pool serves everything, extra threads only cost switching: 3x slower
    // decode on one core.)
    const int cores = omp_get_max_threads();
    const int attention_threads =
        any_paged && fetching ? std::clamp(static_cast<int>(items.size()), cores, 4 * cores)
                              : cores;
    // Item i's attention task at this layer, and the backend that runs it.
    auto task_of = [&](size_t i) {
      const Item& it = items[i];
      const BatchEntry& b = batch[it.entry];
      AttentionTask t;
      t.kv = b.kv;
      t.layer = l;
      t.kv_head = it.kv_head;
      t.q_pos0 = row_pos[it.row0];
      t.n_q = it.n_q;
      t.entry_rows = static_cast<int>(b.tokens.size());
      t.prefill = b.prompt;  // Forward() set it on every part
      t.retrieval_head = !retrieval_heads_.empty() &&
                         retrieval_heads_[static_cast<size_t>(l) * hp.n_head_kv + it.kv_head];
      const size_t head0 = static_cast<size_t>(it.kv_head) * group * D;
      t.q = &q_[static_cast<size_t>(it.row0) * E + head0];
      t.q_stride = E;
      t.out = &attn_[static_cast<size_t>(it.row0) * E + head0];
      t.out_stride = E;
      if (it.last && b.stats != nullptr) {
        t.stats = &(*b.stats)[static_cast<size_t>(l) * hp.n_head + it.kv_head * group];
      }
      return t;
    };
    auto backend_of = [&](size_t i) {
      const BatchEntry& b = batch[items[i].entry];
      return b.attention != nullptr ? b.attention : attention_.get();
    };
    // Every decode task's up-front fetches first (through a pool), so that
    // the transfers of later tasks overlap the computation of earlier ones.
    if (any_paged) {
#pragma omp parallel for schedule(dynamic, 1)
      for (size_t i = 0; i < items.size(); ++i) {
        if (batch[items[i].entry].kv->paged()) readers[i] = backend_of(i)->StartFetches(shape, task_of(i));
      }
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(attention_threads)
    for (size_t i = 0; i < items.size(); ++i) {
      AttentionTask t = task_of(i);
      t.reader = readers[i].get();
      backend_of(i)->Run(shape, t);
      readers[i].reset();  // unpins its pages (here, not serially after the loop)
    }

    PackActivations(w.wo.type, attn_.data(), n, E, E, &packed_);
    MatMul(w.wo, packed_, xn_.data(), E);
    for (size_t i = 0; i < static_cast<size_t>(n) * E; ++i) x_[i] += xn_[i];

#pragma omp parallel for schedule(static) if (n > 8)
    for (int r = 0; r < n; ++r) RmsNorm(&x_[r * E], w.ffn_norm.data(), &xn_[r * E], E, hp.rms_eps);
    PackActivations(w.w_gate.type, xn_.data(), n, E, E, &packed_);
    MatMul(w.w_gate, packed_, gate_.data(), F);
    if (ActivationTypeFor(w.w_up.type) != ActivationTypeFor(w.w_gate.type)) {
      PackActivations(w.w_up.type, xn_.data(), n, E, E, &packed_);
    }
    MatMul(w.w_up, packed_, up_.data(), F);
    for (size_t i = 0; i < static_cast<size_t>(n) * F; ++i) {
      const float g = gate_[i];
      gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
    }
    PackActivations(w.w_down.type, gate_.data(), n, F, F, &packed_);
    MatMul(w.w_down, packed_, xn_.data(), E);
    for (size_t i = 0; i < static_cast<size_t>(n) * E; ++i) x_[i] += xn_[i];
  }

  for (const BatchEntry& b : batch) b.kv->Commit(b.kv->length() + static_cast<int>(b.tokens.size()));
  if (logit_rows.empty()) return;
  const int m = static_cast<int>(logit_rows.size());
  for (int i = 0; i < m; ++i) {
    RmsNorm(&x_[logit_rows[i] * E], model_.output_norm().data(), &xn_[i * E], E, hp.rms_eps);
  }
  PackActivations(model_.output().type, xn_.data(), m, E, E, &packed_);
  MatMul(model_.output(), packed_, logits, hp.n_vocab);
}

}  // namespace psa
