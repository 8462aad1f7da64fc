#include "tests/unit/sparse_attention_testing.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "compute_worker/attention/rank_scores.h"
#include "compute_worker/model/ggml_types.h"

namespace psa::testing {

KvCache RandomCache(int n_head_kv, int length, int block, uint32_t seed,
                    const std::vector<int>& hot, const std::vector<float>& dir, int head_dim) {
  KvCache kv(1, n_head_kv, head_dim, block);
  kv.Reserve(length);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int h = 0; h < n_head_kv; ++h) {
    for (int t = 0; t < length; ++t) {
      const bool is_hot = std::find(hot.begin(), hot.end(), t / block) != hot.end();
      for (int i = 0; i < head_dim; ++i) {
        const float k = n(rng) + (is_hot ? 6.0f * dir[i] : 0.0f);
        const float v = is_hot ? 1.0f + 0.1f * n(rng) : n(rng);
        kv.KeySlot(0, h, t)[i] = Fp32ToFp16(k);
        kv.ValueSlot(0, h, t)[i] = Fp32ToFp16(v);
      }
    }
  }
  kv.Commit(length);
  return kv;
}

Output Attend(const AttentionBackend& backend, const AttentionShape& shape, KvCache& kv,
              const std::vector<float>& q, int kv_head, bool retrieval_head) {
  Output o;
  o.out.assign(shape.group() * shape.head_dim, 0.0f);
  o.stats.resize(shape.group());
  AttentionTask t;
  t.kv = &kv;
  t.kv_head = kv_head;
  t.q_pos0 = kv.length() - 1;
  t.n_q = 1;
  t.retrieval_head = retrieval_head;
  t.q = q.data();
  t.q_stride = static_cast<int>(q.size());
  t.out = o.out.data();
  t.out_stride = static_cast<int>(o.out.size());
  t.stats = o.stats.data();
  backend.Run(shape, t);
  return o;
}

std::vector<float> AttendRows(const AttentionBackend& backend, const AttentionShape& shape,
                              KvCache& kv, const float* q, int rows, int entry_rows,
                              HeadStepStats* last_stats, int end) {
  const int width = shape.group() * shape.head_dim;
  std::vector<float> out(static_cast<size_t>(rows) * width, 0.0f);
  AttentionTask t;
  t.kv = &kv;
  t.q_pos0 = (end < 0 ? kv.length() : end) - rows;
  t.n_q = rows;
  t.entry_rows = entry_rows;
  t.prefill = true;
  t.q = q;
  t.q_stride = width;
  t.out = out.data();
  t.out_stride = width;
  t.stats = last_stats;
  backend.Run(shape, t);
  return out;
}

double RelErr(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

std::vector<float> RandomQuery(int heads, uint32_t seed, float scale, int head_dim) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, scale);
  std::vector<float> q(heads * head_dim);
  for (float& x : q) x = n(rng);
  return q;
}

AttentionPolicy Psa(float eps, bool certified) {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kPsa;
  p.epsilon = eps;
  p.certified = certified;
  p.min_blocks = 0;
  return p;
}

AttentionPolicy TopK(int k) {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kTopK;
  p.top_k = k;
  return p;
}

std::vector<double> BlockMasses(const KvCache& kv, const std::vector<float>& q, float scale) {
  const int block = kv.block_size();
  std::vector<double> mass((kv.length() + block - 1) / block, 0.0);
  for (int t = 0; t < kv.length(); ++t) {
    double dot = 0;
    for (int i = 0; i < kHeadDim; ++i) dot += q[i] * Fp16ToFp32(kv.Keys(0, 0).row(t)[i]);
    mass[t / block] += std::exp(scale * dot);
  }
  return mass;
}

std::vector<int> CandidatesInOrder(const KvCache& kv, const std::vector<float>& q, float scale,
                                   AttentionPolicy::Rank rank) {
  const int blocks = kv.full_blocks();
  std::vector<float> gscore(blocks - 2);
  const float* qs[] = {q.data()};
  RankScores(kv.KeyBounds(0, 0), rank, qs, 1, scale, 1, blocks - 2, nullptr, nullptr,
             gscore.data());
  std::vector<int> order(blocks - 2);
  for (int c = 0; c < blocks - 2; ++c) order[c] = c + 1;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return gscore[a - 1] > gscore[b - 1]; });
  return order;
}

}  // namespace psa::testing
