#include "compute_worker/runtime/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/fp16_kernels.h"
#include "compute_worker/runtime/kv_page_reader.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace psa {
namespace {

// Prefill path: many queries against the same keys. Keys are converted once
// per task into fp32 blocks of kKeyBlock keys stored dimension-major, so one
// query's scores for a whole block come from head_dim broadcast-FMAs with no
// horizontal sums; values are converted to fp32 rows. Every head of the GQA
// group shares the conversion.
constexpr int kKeyBlock = 16;
typedef float KeyLanes __attribute__((vector_size(kKeyBlock * sizeof(float))));

void PrefillAttention(const AttentionShape& shape, const AttentionTask& task,
                      const KvRows& keys, const KvRows& values) {
  const int d = shape.head_dim;
  const int n_keys_max = task.q_pos0 + task.n_q;
  const int n_blocks = (n_keys_max + kKeyBlock - 1) / kKeyBlock;
  thread_local std::vector<KeyLanes> kt;  // [block][dim] -> 16 keys
  thread_local std::vector<float> vf, scores, q16, row;
  kt.resize(static_cast<size_t>(n_blocks) * d);
  vf.resize(static_cast<size_t>(n_keys_max) * d);
  scores.resize(static_cast<size_t>(n_blocks) * kKeyBlock);
  q16.resize(d);
  row.resize(d);
  for (int t0 = 0; t0 < n_keys_max; t0 += values.block_size) {  // rows are contiguous per block
    const int n = std::min(values.block_size, n_keys_max - t0);
    Fp16RowToFp32(values.row(t0), &vf[static_cast<size_t>(t0) * d], n * d);
  }
  for (int b = 0; b < n_blocks; ++b) {
    KeyLanes* blk = &kt[static_cast<size_t>(b) * d];
    for (int j = 0; j < kKeyBlock; ++j) {
      const int t = b * kKeyBlock + j;
      if (t < n_keys_max) {
        Fp16RowToFp32(keys.row(t), row.data(), d);
      } else {
        std::fill(row.begin(), row.end(), 0.0f);
      }
      for (int k = 0; k < d; ++k) blk[k][j] = row[k];
    }
  }
  for (int i = 0; i < task.n_q; ++i) {
    const int n_keys = task.q_pos0 + i + 1;
    const int nb = (n_keys + kKeyBlock - 1) / kKeyBlock;
    for (int g = 0; g < shape.group(); ++g) {
      const float* q = task.q + static_cast<size_t>(i) * task.q_stride + g * d;
      for (int k = 0; k < d; ++k) q16[k] = RoundToFp16(q[k]);
      for (int b = 0; b < nb; ++b) {
        const KeyLanes* blk = &kt[static_cast<size_t>(b) * d];
        KeyLanes acc = {};
        for (int k = 0; k < d; ++k) acc += q16[k] * blk[k];
        acc *= shape.scale;
        std::memcpy(&scores[static_cast<size_t>(b) * kKeyBlock], &acc, sizeof(acc));
      }
      float max = -INFINITY;
      for (int t = 0; t < n_keys; ++t) max = std::max(max, scores[t]);
      const double sum = ExpShiftSum(scores.data(), n_keys, max);
      const float inv = static_cast<float>(1.0 / sum);
      float* out = task.out + static_cast<size_t>(i) * task.out_stride + g * d;
      std::fill(out, out + d, 0.0f);
      for (int t = 0; t < n_keys; ++t) {
        AxpyF32(RoundToFp16(scores[t] * inv), &vf[static_cast<size_t>(t) * d], out, d);
      }
    }
  }
}

#if defined(__AVX512F__)
// scores[g][t] = scale * q_g . k_t for keys [0, n) in blocks of 16, head dim
// 64; returns the number of keys done (a multiple of 16).
int Scores64(const KvRows& keys, const float* q16, int group, int n, float scale,
             float* scores, int stride) {
  alignas(64) float kbuf[16][64];
  // With blocks a multiple of 16 rows, each 16-row chunk is contiguous.
  const bool chunked = keys.block_size % 16 == 0;
  int t = 0;
  for (; t + 16 <= n; t += 16) {
    if (chunked) {
      Fp16RowToFp32(keys.row(t), kbuf[0], 16 * 64);
    } else {
      for (int j = 0; j < 16; ++j) Fp16RowToFp32(keys.row(t + j), kbuf[j], 64);
    }
    for (int g = 0; g < group; ++g) {
      const float* q = q16 + g * 64;
      const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16),
                   q2 = _mm512_loadu_ps(q + 32), q3 = _mm512_loadu_ps(q + 48);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        __m512 a = _mm512_mul_ps(q0, _mm512_load_ps(kbuf[j]));
        a = _mm512_fmadd_ps(q1, _mm512_load_ps(kbuf[j] + 16), a);
        a = _mm512_fmadd_ps(q2, _mm512_load_ps(kbuf[j] + 32), a);
        acc[j] = _mm512_fmadd_ps(q3, _mm512_load_ps(kbuf[j] + 48), a);
      }
      _mm512_storeu_ps(scores + static_cast<size_t>(g) * stride + t,
                       _mm512_mul_ps(SumEach16(acc), _mm512_set1_ps(scale)));
    }
  }
  return t;
}
#endif

#if defined(__AVX512F__)
// out[g] = sum_t p[g][t] * v[t] for head_dim 64 and up to 4 heads, with the
// 4 x 16-float accumulators of every head kept in registers across keys
// (the generic loop reloads and stores the outputs for every key).
void AccumulateValues64(const KvRows& values, const float* p, int p_stride, int n_keys,
                        int group, float* out) {
  __m512 acc[4][4];
  for (auto& a : acc)
    for (auto& x : a) x = _mm512_setzero_ps();
  for (int t0 = 0; t0 < n_keys; t0 += values.block_size) {  // one block at a time
    const uint16_t* v = values.row(t0);
    const int t1 = std::min(n_keys, t0 + values.block_size);
    for (int t = t0; t < t1; ++t, v += 64) {
      __m512 vv[4];
      for (int j = 0; j < 4; ++j) {
        vv[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * j)));
      }
      for (int g = 0; g < 4; ++g) {
        if (g >= group) break;
        const __m512 pg = _mm512_set1_ps(p[static_cast<size_t>(g) * p_stride + t]);
        for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vv[j], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < group; ++g)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + g * 64 + 16 * j, acc[g][j]);
}
#endif

// Decode path: few queries. Each key and value row is converted once and
// used by every head of the group while it is in registers / L1.
void DecodeAttention(const AttentionShape& shape, const AttentionTask& task,
                     const KvRows& keys, const KvRows& values) {
  const int d = shape.head_dim, group = shape.group();
  thread_local std::vector<float> scores, q16, row;  // scores: [group][n_keys]
  const int n_keys_max = task.q_pos0 + task.n_q;
  scores.resize(static_cast<size_t>(group) * n_keys_max);
  q16.resize(static_cast<size_t>(group) * d);
  row.resize(d);
  for (int i = 0; i < task.n_q; ++i) {
    const int n_keys = task.q_pos0 + i + 1;
    for (int g = 0; g < group; ++g) {
      const float* q = task.q + static_cast<size_t>(i) * task.q_stride + g * d;
      for (int k = 0; k < d; ++k) q16[g * d + k] = RoundToFp16(q[k]);
    }
    int t = 0;
#if defined(__AVX512F__)
    if (d == 64) t = Scores64(keys, q16.data(), group, n_keys, shape.scale, scores.data(), n_keys_max);
#endif
    for (; t < n_keys; ++t) {
      Fp16RowToFp32(keys.row(t), row.data(), d);
      for (int g = 0; g < group; ++g) {
        scores[static_cast<size_t>(g) * n_keys_max + t] =
            DotF32(&q16[g * d], row.data(), d) * shape.scale;
      }
    }
    float inv[kMaxGqaGroup];
    for (int g = 0; g < group; ++g) {
      float* s = &scores[static_cast<size_t>(g) * n_keys_max];
      float max = -INFINITY;
      for (int t = 0; t < n_keys; ++t) max = std::max(max, s[t]);
      const double sum = ExpShiftSum(s, n_keys, max);
      inv[g] = static_cast<float>(1.0 / sum);
    }
    // Probabilities, normalised and rounded to fp16 as llama.cpp does.
    for (int g = 0; g < group; ++g) {
      float* s = &scores[static_cast<size_t>(g) * n_keys_max];
#pragma omp simd
      for (int t = 0; t < n_keys; ++t) s[t] = RoundToFp16(s[t] * inv[g]);
    }
    float* out0 = task.out + static_cast<size_t>(i) * task.out_stride;
#if defined(__AVX512F__)
    if (d == 64 && group <= 4) {
      AccumulateValues64(values, scores.data(), n_keys_max, n_keys, group, out0);
      continue;
    }
#endif
    std::fill(out0, out0 + group * d, 0.0f);
    for (int t = 0; t < n_keys; ++t) {
      Fp16RowToFp32(values.row(t), row.data(), d);
      for (int g = 0; g < group; ++g) {
        AxpyF32(scores[static_cast<size_t>(g) * n_keys_max + t], row.data(), out0 + g * d, d);
      }
    }
  }
}

}  // namespace

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
  const KvRows keys = reader.Keys();
  const KvRows values = reader.Values();
  if (task.n_q >= 8) {
    PrefillAttention(shape, task, keys, values);
  } else {
    DecodeAttention(shape, task, keys, values);
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
