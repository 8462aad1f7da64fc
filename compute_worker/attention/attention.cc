#include "compute_worker/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "compute_worker/attention/prefill_attention.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/kv/kv_page_reader.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace psa {
namespace {

// Every query row gets the same arithmetic whether it is computed alone (a
// decode step) or with other rows (a prompt chunk): its scores, its
// probabilities and its output depend only on the row, never on which rows
// share its task. A prompt whose prefix was loaded from the KV service (so
// its remaining rows are chunked differently) therefore continues exactly
// as one computed from scratch. A chunk of rows is tiled
// (prefill_attention.h) with each row's arithmetic unchanged; one row
// converts keys and values as it reads them (KvSource below).

// Where key or value rows come from: the cache (fp16, converted on use) or
// fp32 copies made once for a chunk of rows.
struct KvSource {
  const KvRows* rows = nullptr;  // fp16
  const float* f32 = nullptr;    // or [t][d] fp32
  int d = 0;
  // Row t as fp32, in `scratch` if it needs converting.
  const float* Row(int t, float* scratch) const {
    if (f32 != nullptr) return f32 + static_cast<size_t>(t) * d;
    Fp16RowToFp32(rows->row(t), scratch, d);
    return scratch;
  }
};

#if defined(__AVX512F__)
// Blocks ahead whose rows are prefetched (into L2: more lines in flight than
// L1's fill buffers allow). A sweep reads the K (or V) half of each page, so
// the hardware prefetcher, which stops at page boundaries, leaves a single
// core far below its read bandwidth on long contexts.
constexpr int kPrefetchBlocks = 32;
// Keys whose probabilities the value pass makes at a time (rounded to whole
// blocks): 4 KiB per head, read back from L1.
constexpr int kValueChunk = 1024;

// Asks for the whole page of block b (a page holds the block's keys, then
// its values: KvCache's layout) into the caches.
inline void PrefetchPage(const KvRows& rows, int b) {
  PrefetchBytes<2>(rows.pages[b], static_cast<size_t>(2) * rows.block_size * rows.dim * sizeof(uint16_t));
}

// Asks for rows [t, t + n) of `rows` (within one block) into the caches.
inline void PrefetchRows(const KvRows& rows, int t, int n) {
  PrefetchBytes<2>(rows.row(t), static_cast<size_t>(n) * rows.dim * sizeof(uint16_t));
}

// scores[g][t] = scale * q_g . k_t for keys [0, n) in chunks of 16, head dim
// 64, kGroup heads; returns the number of keys done (a multiple of 16).
// Needs blocks of a multiple of 16 rows (each chunk contiguous).
template <int kGroup>
int Scores64(const KvSource& keys, const float* q16, int n, float scale, float* scores,
             int stride) {
  const float* q[kGroup];
  for (int g = 0; g < kGroup; ++g) q[g] = q16 + g * 64;
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 dots[kGroup];
  if (keys.f32 != nullptr) {
    int t = 0;
    for (; t + 16 <= n; t += 16) {
      for (int g = 0; g < kGroup; ++g) {
        _mm512_storeu_ps(scores + static_cast<size_t>(g) * stride + t,
                         _mm512_mul_ps(Dot16Rows64(q[g], keys.f32 + static_cast<size_t>(t) * 64), vscale));
      }
    }
    return t;
  }
  // fp16 rows, block by block (a block's rows are contiguous).
  const KvRows& rows = *keys.rows;
  const int B = rows.block_size, full = n / 16 * 16;
  for (int t0 = 0; t0 < full; t0 += B) {
    const int pf = t0 + kPrefetchBlocks * B;
    // The whole page, K and then V: one contiguous 4 KiB read instead of
    // every other 2 KiB now and the rest in the value pass (where it is
    // then found in the caches). Measured at 64K tokens: 20% faster.
    if (pf < n) PrefetchPage(rows, pf / B);
    const uint16_t* k = rows.row(t0);
    for (int t = t0; t < std::min(full, t0 + B); t += 16, k += 16 * 64) {
      Dot16RowsFp16x64<kGroup>(q, k, dots);
      for (int g = 0; g < kGroup; ++g) {
        _mm512_storeu_ps(scores + static_cast<size_t>(g) * stride + t, _mm512_mul_ps(dots[g], vscale));
      }
    }
  }
  return full;
}

// Scores64 for a run-time group size of 1-4; 0 keys done for others.
int Scores64(const KvSource& keys, const float* q16, int group, int n, float scale, float* scores,
             int stride) {
  int done = 0;
  WithGroup(group, [&](auto g) { done = Scores64<decltype(g)::value>(keys, q16, n, scale, scores, stride); });
  return done;
}

// out[g] = sum_t p[g][t] * v[t] for head_dim 64 and kGroup heads, with the
// 4 x 16-float accumulators of every head kept in registers across keys
// (the group size is a template argument so that they are not spilled).
// p[g][t] is first made inv[g] * p[g][t] rounded to fp16 (ScaleRoundToFp16),
// a chunk of keys at a time, so that the value pass reads them still in L1
// instead of after a pass of their own over the whole context (2-5% shorter
// at 8K-32K tokens).
template <int kGroup>
void AccumulateValues64(const KvSource& values, int block_size, const float* inv, float* p,
                        int p_stride, int n_keys, float* out) {
  const int chunk = std::max(1, kValueChunk / block_size) * block_size;
  int rounded = 0;  // p[.][0, rounded) are probabilities
  auto round_upto = [&](int t) __attribute__((always_inline)) {
    if (t <= rounded) return;
    const int end = std::min(n_keys, rounded + chunk);
    for (int g = 0; g < kGroup; ++g) {
      ScaleRoundToFp16(inv[g], p + static_cast<size_t>(g) * p_stride + rounded, end - rounded);
    }
    rounded = end;
  };
  __m512 acc[kGroup][4];
  for (auto& a : acc)
    for (auto& x : a) x = _mm512_setzero_ps();
  if (values.f32 != nullptr) {
    for (int t = 0; t < n_keys; ++t) {
      round_upto(t + 1);
      const float* v = values.f32 + static_cast<size_t>(t) * 64;
      const __m512 vv[4] = {_mm512_loadu_ps(v), _mm512_loadu_ps(v + 16),
                            _mm512_loadu_ps(v + 32), _mm512_loadu_ps(v + 48)};
      AccumulateRow64<kGroup>(p + t, p_stride, vv, acc);
    }
  } else {
    for (int t0 = 0; t0 < n_keys; t0 += block_size) {  // rows contiguous within a block
      const int pf = t0 + kPrefetchBlocks * block_size;
      if (pf < n_keys) PrefetchRows(*values.rows, pf, std::min(block_size, n_keys - pf));
      round_upto(t0 + 1);
      const uint16_t* v = values.rows->row(t0);
      for (int t = t0; t < std::min(n_keys, t0 + block_size); ++t, v += 64) {
        __m512 vv[4];
        Fp16Row64(v, vv);
        AccumulateRow64<kGroup>(p + t, p_stride, vv, acc);
      }
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + g * 64 + 16 * j, acc[g][j]);
}

// Scores and values 16 keys at a time for the groups and head dims
// Scores64 / AccumulateValues64 do not take (head dim 128, groups of 5-8:
// the Qwen2 models), bit-equal to DotF32 and AxpyF32 per key: a block's 16
// key rows are converted once and dotted with every head (DotF32x16, no
// reduction per key), and the value rows go into register accumulators
// (AccumulateHeads) instead of a load and store of the output per key and
// head. Needs blocks of a multiple of 16 rows.
template <int D>
int ScoresByBlock(const KvRows& rows, const float* q16, int group, int n, float scale,
                  float* scores, int stride) {
  const int full = n / 16 * 16;
  alignas(64) float kf[16 * D];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int t = 0; t < full; t += 16) {
    if (t % rows.block_size == 0) {
      const int pf = t + kPrefetchBlocks * rows.block_size;
      if (pf < n) PrefetchPage(rows, pf / rows.block_size);
    }
    Fp16RowToFp32(rows.row(t), kf, 16 * D);
    for (int g = 0; g < group; ++g) {
      __m512 q[D / 16];
      for (int c = 0; c < D / 16; ++c) q[c] = _mm512_loadu_ps(q16 + g * D + 16 * c);
      _mm512_storeu_ps(scores + static_cast<size_t>(g) * stride + t,
                       _mm512_mul_ps(DotF32x16<D>(q, kf), vscale));
    }
  }
  return full;
}

// out[g] = sum_t p[g][t] v_t over keys [0, n) (p already probabilities).
template <int D>
void ValuesByBlock(const KvRows& rows, int group, const float* p, int stride, int n,
                   float* out) {
  alignas(64) float vf[16 * D];
  const float* pp[kMaxGqaGroup];
  float* op[kMaxGqaGroup];
  for (int g = 0; g < group; ++g) {
    op[g] = out + g * D;
    std::fill(op[g], op[g] + D, 0.0f);
  }
  for (int t = 0; t < n; t += 16) {
    const int m = std::min(16, n - t);  // within a block: block_size % 16 == 0
    Fp16RowToFp32(rows.row(t), vf, m * D);
    for (int g = 0; g < group; ++g) pp[g] = p + static_cast<size_t>(g) * stride + t;
    AccumulateHeads<D>(vf, m, pp, op, group);
  }
}

#endif

// Query rows [0, n_q) of the task; row i attends to keys [0, q_pos0 + i].
// Rows are computed one at a time (a decode step); each key and value row
// is converted as it is read and used by every head of the group. Prompt
// chunks go through TiledPrefillAttention, which gives each row this same
// arithmetic bit for bit.
void RowAttention(const AttentionShape& shape, const AttentionTask& task, const KvRows& keys,
                  const KvRows& values) {
  const int d = shape.head_dim, group = shape.group();
  const int n_keys_max = task.q_pos0 + task.n_q;
  thread_local std::vector<float> scores, q16, row;  // scores: [group][n_keys]
  scores.resize(static_cast<size_t>(group) * n_keys_max);
  q16.resize(static_cast<size_t>(group) * d);
  row.resize(d);
  const KvSource ksrc{&keys, nullptr, d}, vsrc{&values, nullptr, d};
  for (int i = 0; i < task.n_q; ++i) {
    const int n_keys = task.q_pos0 + i + 1;
    for (int g = 0; g < group; ++g) {
      const float* q = task.q + static_cast<size_t>(i) * task.q_stride + g * d;
      for (int k = 0; k < d; ++k) q16[g * d + k] = RoundToFp16(q[k]);
    }
    int t = 0;
#if defined(__AVX512F__)
    const bool by_block = keys.block_size % 16 == 0 && (d == 128 || (d == 64 && group > 4));
    if (by_block) {
      t = d == 64 ? ScoresByBlock<64>(keys, q16.data(), group, n_keys, shape.scale,
                                      scores.data(), n_keys_max)
                  : ScoresByBlock<128>(keys, q16.data(), group, n_keys, shape.scale,
                                       scores.data(), n_keys_max);
    } else if (d == 64 && keys.block_size % 16 == 0) {
      t = Scores64(ksrc, q16.data(), group, n_keys, shape.scale, scores.data(), n_keys_max);
    }
#endif
    for (; t < n_keys; ++t) {
      const float* k = ksrc.Row(t, row.data());
      for (int g = 0; g < group; ++g) {
        scores[static_cast<size_t>(g) * n_keys_max + t] = DotF32(&q16[g * d], k, d) * shape.scale;
      }
    }
    float inv[kMaxGqaGroup];
    for (int g = 0; g < group; ++g) {
      float* s = &scores[static_cast<size_t>(g) * n_keys_max];
      const double sum = ExpShiftSum(s, n_keys, MaxF32(s, n_keys));
      inv[g] = static_cast<float>(1.0 / sum);
    }
    // Probabilities, normalised and rounded to fp16 as llama.cpp does (the
    // AVX-512 value pass does it as it goes).
    float* out0 = task.out + static_cast<size_t>(i) * task.out_stride;
#if defined(__AVX512F__)
    if (d == 64 && WithGroup(group, [&](auto g) {
          AccumulateValues64<decltype(g)::value>(vsrc, values.block_size, inv, scores.data(),
                                                 n_keys_max, n_keys, out0);
        })) {
      continue;
    }
#endif
    for (int g = 0; g < group; ++g) {
      ScaleRoundToFp16(inv[g], &scores[static_cast<size_t>(g) * n_keys_max], n_keys);
    }
#if defined(__AVX512F__)
    if (by_block) {
      if (d == 64) {
        ValuesByBlock<64>(values, group, scores.data(), n_keys_max, n_keys, out0);
      } else {
        ValuesByBlock<128>(values, group, scores.data(), n_keys_max, n_keys, out0);
      }
      continue;
    }
#endif
    std::fill(out0, out0 + group * d, 0.0f);
    for (int t = 0; t < n_keys; ++t) {
      const float* v = vsrc.Row(t, row.data());
      for (int g = 0; g < group; ++g) {
        AxpyF32(scores[static_cast<size_t>(g) * n_keys_max + t], v, out0 + g * d, d);
      }
    }
  }
}

}  // namespace

std::unique_ptr<KvPageReader> AttentionBackend::StartFetches(const AttentionShape&,
                                                             const AttentionTask&) const {
  return nullptr;
}

void DenseAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  // Dense reads every page of the (layer, head): ask for all of them up
  // front so the fetches of absent ones overlap each other.
  KvPageReader reader(*task.kv, task.layer, task.kv_head);
  const int n_blocks = (task.q_pos0 + task.n_q + task.kv->block_size() - 1) / task.kv->block_size();
  if (task.kv->paged()) {
    std::vector<int> all(n_blocks);
    for (int b = 0; b < n_blocks; ++b) all[b] = b;
    reader.Prefetch(all);
    for (int b = 0; b < n_blocks; ++b) reader.Page(b);
  }
  if (task.n_q > 1 && TiledPrefillAttentionEnabled()) {
    TiledPrefillAttention(shape, task, reader.Keys(), reader.Values());
  } else {
    RowAttention(shape, task, reader.Keys(), reader.Values());
  }
  if (task.stats != nullptr) {
    const int n_keys = task.q_pos0 + task.n_q;
    const int blocks = (n_keys + task.kv->block_size() - 1) / task.kv->block_size();
    for (int g = 0; g < shape.group(); ++g) {
      task.stats[g] = HeadStepStats{blocks, blocks, 1, 1.0f};
    }
  }
}

}  // namespace psa
