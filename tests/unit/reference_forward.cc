#include "tests/unit/reference_forward.h"

#include <cmath>
#include <random>
#include <string>

#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"

namespace psa {

std::unique_ptr<LlamaModel> TinyModel(const testing::TinyModelSpec& spec) {
  auto bytes = testing::BuildTinyLlamaGguf(spec);
  const std::string path = testing::WriteTempFile(bytes, "runtime_test_" + std::to_string(spec.seed) + ".gguf");
  auto m = LlamaModel::Load(path);
  EXPECT_TRUE(m.ok()) << m.status().message();
  return m.ok() ? std::move(*m) : nullptr;
}

std::vector<float> Dequantize(const WeightMatrix& w) {
  std::vector<float> out(w.rows * w.cols);
  for (int64_t r = 0; r < w.rows; ++r) DequantizeRow(w.type, w.row(r), &out[r * w.cols], w.cols);
  return out;
}

std::vector<double> ReferenceForward(const LlamaModel& m, const std::vector<TokenId>& tokens) {
  const LlamaHparams& hp = m.hparams();
  const int E = hp.n_embd, D = hp.head_dim, H = hp.n_head, KV = hp.n_head_kv, F = hp.n_ff;
  const int n = static_cast<int>(tokens.size());
  auto matvec = [](const std::vector<float>& w, int rows, int cols, const std::vector<double>& x) {
    std::vector<double> y(rows, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) y[r] += static_cast<double>(w[r * cols + c]) * x[c];
    return y;
  };
  auto norm = [&](const std::vector<double>& x, const std::vector<float>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double s = 1.0 / std::sqrt(ss / x.size() + hp.rms_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * s * w[i];
    return y;
  };
  // Pair i of a head is (2i, 2i+1), or (i, i + rope_dim/2) for NeoX style.
  const bool neox = hp.rope_style == LlamaHparams::RopeStyle::kNeox;
  auto rope = [&](std::vector<double>& v, int heads, int pos) {
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < hp.rope_dim / 2; ++i) {
        double theta = pos * std::pow(static_cast<double>(hp.rope_base), -2.0 * i / hp.rope_dim);
        if (!hp.rope_freq_factors.empty()) theta /= hp.rope_freq_factors[i];
        const int ia = h * D + (neox ? i : 2 * i);
        const int ib = ia + (neox ? hp.rope_dim / 2 : 1);
        const double a = v[ia], b = v[ib];
        v[ia] = a * std::cos(theta) - b * std::sin(theta);
        v[ib] = a * std::sin(theta) + b * std::cos(theta);
      }
  };
  auto add = [](std::vector<double>& v, const std::vector<float>& bias) {
    for (size_t i = 0; i < bias.size(); ++i) v[i] += bias[i];
  };
  const std::vector<float> embd = Dequantize(m.token_embd());
  std::vector<std::vector<double>> x(n, std::vector<double>(E));
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < E; ++i) x[t][i] = embd[static_cast<size_t>(tokens[t]) * E + i];
  for (int l = 0; l < hp.n_layer; ++l) {
    const LayerWeights& w = m.layer(l);
    const auto wq = Dequantize(w.wq), wk = Dequantize(w.wk), wv = Dequantize(w.wv),
               wo = Dequantize(w.wo), wg = Dequantize(w.w_gate), wu = Dequantize(w.w_up),
               wd = Dequantize(w.w_down);
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      const auto xn = norm(x[t], w.attn_norm);
      q[t] = matvec(wq, E, E, xn);
      k[t] = matvec(wk, KV * D, E, xn);
      v[t] = matvec(wv, KV * D, E, xn);
      add(q[t], w.bq);
      add(k[t], w.bk);
      add(v[t], w.bv);
      rope(q[t], H, t);
      rope(k[t], KV, t);
    }
    for (int t = 0; t < n; ++t) {
      std::vector<double> att(E, 0.0);
      for (int h = 0; h < H; ++h) {
        const int g = h / (H / KV);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          double d = 0;
          for (int i = 0; i < D; ++i) d += q[t][h * D + i] * k[j][g * D + i];
          s[j] = d / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int j = 0; j <= t; ++j)
          for (int i = 0; i < D; ++i) att[h * D + i] += s[j] / sum * v[j][g * D + i];
      }
      const auto o = matvec(wo, E, E, att);
      for (int i = 0; i < E; ++i) x[t][i] += o[i];
      const auto hn = norm(x[t], w.ffn_norm);
      auto gt = matvec(wg, F, E, hn);
      const auto up = matvec(wu, F, E, hn);
      for (int i = 0; i < F; ++i) gt[i] = gt[i] / (1 + std::exp(-gt[i])) * up[i];
      const auto dn = matvec(wd, E, F, gt);
      for (int i = 0; i < E; ++i) x[t][i] += dn[i];
    }
  }
  const auto out_w = Dequantize(m.output());
  return matvec(out_w, hp.n_vocab, E, norm(x[n - 1], m.output_norm()));
}

std::vector<TokenId> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(n);
  for (auto& x : t) x = rng() % vocab;
  return t;
}

ReferenceComparison CompareWithReference(const LlamaModel& m, const std::vector<TokenId>& tokens) {
  ReferenceComparison c;
  LlamaRuntime rt(m, RuntimeOptions{});
  KvCache kv = rt.NewCache();
  const absl::Status s = rt.Prefill(&kv, tokens, &c.got);
  EXPECT_TRUE(s.ok()) << s;
  if (!s.ok()) return c;
  c.ok = true;
  c.want = ReferenceForward(m, tokens);
  for (size_t i = 0; i < c.want.size(); ++i) {
    c.max_err = std::max(c.max_err, std::fabs(c.got[i] - c.want[i]));
    c.max_ref = std::max(c.max_ref, std::fabs(c.want[i]));
  }
  return c;
}

}  // namespace psa
