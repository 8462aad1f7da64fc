#include "compute_worker/runtime/attention.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "compute_worker/model/ggml_types.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace psa {
namespace {

// dot(q, fp16 row) for d a multiple of 8 (scalar tail otherwise).
inline float DotF16(const float* q, const uint16_t* k, int d) {
  int i = 0;
  float s = 0;
#if defined(__AVX2__) && defined(__F16C__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)));
    const __m256 k1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), k0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), k1, acc1);
  }
  for (; i + 8 <= d; i += 8) {
    const __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), k0, acc0);
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  s = _mm_cvtss_f32(v);
#endif
  for (; i < d; ++i) s += q[i] * Fp16ToFp32(k[i]);
  return s;
}

// acc += p * fp16 row.
inline void AxpyF16(float p, const uint16_t* v, float* acc, int d) {
  int i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  const __m256 pp = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8) {
    const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i)));
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pp, v0, _mm256_loadu_ps(acc + i)));
  }
#endif
  for (; i < d; ++i) acc[i] += p * Fp16ToFp32(v[i]);
}

inline float RoundToFp16(float x) { return Fp16ToFp32(Fp32ToFp16(x)); }

}  // namespace

namespace {

// Prefill path: many queries against the same keys. Keys are converted once
// per task into fp32 blocks of kKeyBlock keys stored dimension-major, so one
// query's scores for a whole block come from head_dim broadcast-FMAs with no
// horizontal sums; values are converted to fp32 rows.
constexpr int kKeyBlock = 16;
typedef float KeyLanes __attribute__((vector_size(kKeyBlock * sizeof(float))));

void PrefillAttention(const AttentionShape& shape, const AttentionTask& task,
                      const uint16_t* keys, const uint16_t* values) {
  const int d = shape.head_dim;
  const int n_keys_max = task.q_pos0 + task.n_q;
  const int n_blocks = (n_keys_max + kKeyBlock - 1) / kKeyBlock;
  thread_local std::vector<KeyLanes> kt;   // [block][dim] -> 16 keys
  thread_local std::vector<float> vf, scores, q16, row;
  kt.resize(static_cast<size_t>(n_blocks) * d);
  vf.resize(static_cast<size_t>(n_keys_max) * d);
  scores.resize(static_cast<size_t>(n_blocks) * kKeyBlock);
  q16.resize(d);
  row.resize(d);
  DequantizeRow(GgmlType::kF16, values, vf.data(), static_cast<int64_t>(n_keys_max) * d);
  for (int b = 0; b < n_blocks; ++b) {
    KeyLanes* blk = &kt[static_cast<size_t>(b) * d];
    for (int j = 0; j < kKeyBlock; ++j) {
      const int t = b * kKeyBlock + j;
      if (t < n_keys_max) {
        DequantizeRow(GgmlType::kF16, keys + static_cast<size_t>(t) * d, row.data(), d);
      } else {
        std::fill(row.begin(), row.end(), 0.0f);
      }
      for (int k = 0; k < d; ++k) blk[k][j] = row[k];
    }
  }
  for (int i = 0; i < task.n_q; ++i) {
    const int n_keys = task.q_pos0 + i + 1;
    const float* q = task.q + static_cast<size_t>(i) * task.q_stride;
    for (int k = 0; k < d; ++k) q16[k] = RoundToFp16(q[k]);
    const int nb = (n_keys + kKeyBlock - 1) / kKeyBlock;
    for (int b = 0; b < nb; ++b) {
      const KeyLanes* blk = &kt[static_cast<size_t>(b) * d];
      KeyLanes acc = {};
      for (int k = 0; k < d; ++k) acc += q16[k] * blk[k];
      acc *= shape.scale;
      std::memcpy(&scores[static_cast<size_t>(b) * kKeyBlock], &acc, sizeof(acc));
    }
    float max = -INFINITY;
    for (int t = 0; t < n_keys; ++t) max = std::max(max, scores[t]);
    double sum = 0;
    for (int t = 0; t < n_keys; ++t) {
      scores[t] = std::exp(scores[t] - max);
      sum += scores[t];
    }
    const float inv = static_cast<float>(1.0 / sum);
    float* out = task.out + static_cast<size_t>(i) * task.out_stride;
    std::fill(out, out + d, 0.0f);
    for (int t = 0; t < n_keys; ++t) {
      const float p = RoundToFp16(scores[t] * inv);
      const float* v = &vf[static_cast<size_t>(t) * d];
#pragma omp simd
      for (int k = 0; k < d; ++k) out[k] += p * v[k];
    }
  }
}

}  // namespace

void DenseAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  const int d = shape.head_dim;
  const int group = shape.n_head / shape.n_head_kv;
  const int kv_head = task.head / group;
  const uint16_t* keys = task.kv->Keys(task.layer, kv_head);
  const uint16_t* values = task.kv->Values(task.layer, kv_head);
  if (task.n_q >= 8) {
    PrefillAttention(shape, task, keys, values);
    return;
  }
  thread_local std::vector<float> scores, q16;
  scores.resize(task.q_pos0 + task.n_q);
  q16.resize(d);
  for (int i = 0; i < task.n_q; ++i) {
    const int n_keys = task.q_pos0 + i + 1;
    const float* q = task.q + static_cast<size_t>(i) * task.q_stride;
    for (int j = 0; j < d; ++j) q16[j] = RoundToFp16(q[j]);
    float max = -INFINITY;
    for (int t = 0; t < n_keys; ++t) {
      scores[t] = DotF16(q16.data(), keys + static_cast<size_t>(t) * d, d) * shape.scale;
      max = std::max(max, scores[t]);
    }
    double sum = 0;
    for (int t = 0; t < n_keys; ++t) {
      scores[t] = std::exp(scores[t] - max);
      sum += scores[t];
    }
    const float inv = static_cast<float>(1.0 / sum);
    float* out = task.out + static_cast<size_t>(i) * task.out_stride;
    std::fill(out, out + d, 0.0f);
    for (int t = 0; t < n_keys; ++t) {
      AxpyF16(RoundToFp16(scores[t] * inv), values + static_cast<size_t>(t) * d, out, d);
    }
  }
}

}  // namespace psa
