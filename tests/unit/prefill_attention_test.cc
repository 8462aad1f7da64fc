// Dense attention over prompt chunks (TiledPrefillAttention behind
// DenseAttention for n_q > 1) against a plain double-precision reference,
// and bit for bit against the same rows computed one at a time (the decode
// path), for head dims 64 and 128, GQA groups 1/3/6/7, chunks of 1-40 rows
// starting at the prompt's start or in its middle, and block sizes with and
// without partial 16-key chunks.
#include <cmath>
#include <random>
#include <vector>

#include "compute_worker/attention/attention.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr int kHeadsKv = 2;
constexpr int kHead = 1;  // the KV head the tasks use (not the first)

struct Case {
  int dim, group, block, length;
};

class PrefillAttentionTest : public ::testing::TestWithParam<Case> {};

// One task of rows [pos0, pos0 + n) of head kHead's group; q: [position][g][d].
std::vector<float> RunRows(const AttentionShape& shape, KvCache& kv, const std::vector<float>& q,
                       int pos0, int n) {
  const int G = shape.group(), d = shape.head_dim;
  std::vector<float> out(static_cast<size_t>(n) * G * d, -1.0f);
  AttentionTask t;
  t.kv = &kv;
  t.kv_head = kHead;
  t.q_pos0 = pos0;
  t.n_q = n;
  t.entry_rows = n;
  t.prefill = true;
  t.q = q.data() + static_cast<size_t>(pos0) * G * d;
  t.q_stride = G * d;
  t.out = out.data();
  t.out_stride = G * d;
  DenseAttention().Run(shape, t);
  return out;
}

TEST_P(PrefillAttentionTest, MatchesReferenceAndTheRowByRowPath) {
  const Case c = GetParam();
  const int d = c.dim, G = c.group, L = c.length;
  const AttentionShape shape{G * kHeadsKv, kHeadsKv, d, 1.0f / std::sqrt(static_cast<float>(d))};
  KvCache kv(1, kHeadsKv, d, c.block);
  kv.Reserve(L);
  std::mt19937 rng(d * 100 + G * 10 + c.block);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int h = 0; h < kHeadsKv; ++h) {
    for (int t = 0; t < L; ++t) {
      for (int i = 0; i < d; ++i) {
        kv.KeySlot(0, h, t)[i] = Fp32ToFp16(normal(rng) + (i == 3 ? 2.0f : 0.0f));
        kv.ValueSlot(0, h, t)[i] = Fp32ToFp16(normal(rng));
      }
    }
  }
  kv.Commit(L);
  // Queries of every position; some heads peaked (large norms).
  std::vector<float> q(static_cast<size_t>(L) * G * d);
  for (size_t j = 0; j < q.size(); ++j) q[j] = normal(rng) * (1.0f + 2.0f * ((j / d) % 3 == 1));

  // The reference and the row-by-row (decode) outputs of every position.
  std::vector<double> ref(static_cast<size_t>(L) * G * d);
  std::vector<float> single(static_cast<size_t>(L) * G * d);
  for (int p = 0; p < L; ++p) {
    const std::vector<float> one = RunRows(shape, kv, q, p, 1);
    std::copy(one.begin(), one.end(), single.begin() + static_cast<size_t>(p) * G * d);
    for (int g = 0; g < G; ++g) {
      const float* qg = &q[(static_cast<size_t>(p) * G + g) * d];
      std::vector<double> s(p + 1);
      double m = -INFINITY;
      for (int t = 0; t <= p; ++t) {
        const uint16_t* k = kv.KeySlot(0, kHead, t);
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(qg[i]) * Fp16ToFp32(k[i]);
        s[t] = dot * shape.scale;
        m = std::max(m, s[t]);
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - m));
      double* o = &ref[(static_cast<size_t>(p) * G + g) * d];
      for (int t = 0; t <= p; ++t) {
        const uint16_t* v = kv.ValueSlot(0, kHead, t);
        for (int i = 0; i < d; ++i) o[i] += s[t] / sum * Fp16ToFp32(v[i]);
      }
    }
  }

  // Chunks starting everywhere (every 5th position), so that many straddle
  // the kernel's 128-key tiles: rows whose keys end before a tile and rows
  // that reach into it in one chunk (which it once got wrong).
  for (int pos0 = 0; pos0 < L; pos0 += pos0 < 300 ? 5 : 97) {
    for (int n = 1; n <= 40 && pos0 + n <= L; ++n) {
      const std::vector<float> out = RunRows(shape, kv, q, pos0, n);
      const size_t base = static_cast<size_t>(pos0) * G * d;
      int bad_ref = 0, bad_bits = 0;
      for (size_t j = 0; j < out.size(); ++j) {
        if (std::abs(out[j] - ref[base + j]) > 4e-3 + 2e-3 * std::abs(ref[base + j])) ++bad_ref;
        if (out[j] != single[base + j]) ++bad_bits;
      }
      ASSERT_EQ(bad_ref, 0) << "pos0 " << pos0 << " rows " << n;
      ASSERT_EQ(bad_bits, 0) << "pos0 " << pos0 << " rows " << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PrefillAttentionTest,
    ::testing::Values(Case{64, 1, 16, 230}, Case{64, 3, 16, 230}, Case{64, 6, 16, 230},
                      Case{64, 7, 16, 230}, Case{128, 1, 16, 230}, Case{128, 3, 16, 230},
                      Case{128, 6, 16, 230}, Case{128, 7, 16, 230},
                      // Blocks of 24: 16-key chunks straddle pages.
                      Case{64, 3, 24, 200}, Case{128, 6, 24, 200},
                      // Long enough for several row tiles in one task.
                      Case{64, 7, 16, 2100}, Case{128, 6, 32, 1500}, Case{64, 3, 16, 700}),
    [](const auto& info) {
      return "d" + std::to_string(info.param.dim) + "_g" + std::to_string(info.param.group) +
             "_b" + std::to_string(info.param.block) + "_n" + std::to_string(info.param.length);
    });

}  // namespace
}  // namespace psa
