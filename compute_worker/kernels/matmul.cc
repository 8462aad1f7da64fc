#include "compute_worker/kernels/matmul.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/kernels/kquant_gemm.h"
#include "compute_worker/kernels/kquant_dot.h"
#include "compute_worker/kernels/quant_simd.h"

namespace psa {
namespace {

#if defined(__AVX2__)

using simd::DotS8S8;
using simd::DotU8S8;
using simd::Fp16Pair;
using simd::HorizontalSum;
using simd::UnpackNibbles;

// One weight row against N activation rows; the weight block is unpacked
// once and reused for every activation row.
template <int N>
void DotQ4_1xQ8_1(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ4_1*>(w_row);
  const BlockQ8_1* x[N];
  for (int t = 0; t < N; ++t) x[t] = reinterpret_cast<const BlockQ8_1*>(x_rows[t]);
  auto load = [&](int t, int b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t][b].qs));
  };
#if defined(PSA_TILE_GEMM)  // the tile GEMM's arithmetic (kquant_gemm.h)
  simd::TileBlockRow<N, true>(
      nb, [&](int b) { return UnpackNibbles(w[b].qs); },
      [&](__m256i q, int t, int b) { return DotU8S8(q, load(t, b)); },
      [&](int b) { return Fp16ToFp32(w[b].d); },
      [&](int t, int b) { return Fp16ToFp32(x[t][b].d); }, out,
      [&](int b) { return Fp16ToFp32(w[b].m); },
      [&](int t, int b) { return Fp16ToFp32(x[t][b].s); });
#else
  __m256 acc[N];
  float mins[N];
  for (int t = 0; t < N; ++t) {
    acc[t] = _mm256_setzero_ps();
    mins[t] = 0;
  }
  for (int b = 0; b < nb; ++b) {
    const __m256i q4 = UnpackNibbles(w[b].qs);
    const float dw = Fp16ToFp32(w[b].d), mw = Fp16ToFp32(w[b].m);
    for (int t = 0; t < N; ++t) {
      const __m256 p = _mm256_cvtepi32_ps(DotU8S8(q4, load(t, b)));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * Fp16ToFp32(x[t][b].d)), p, acc[t]);
      mins[t] += mw * Fp16ToFp32(x[t][b].s);
    }
  }
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]) + mins[t];
#endif
}

template <int N>
void DotQ4_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ4_0*>(w_row);
  const BlockQ8_0* x[N];
  __m256 acc[N];
  for (int t = 0; t < N; ++t) {
    x[t] = reinterpret_cast<const BlockQ8_0*>(x_rows[t]);
    acc[t] = _mm256_setzero_ps();
  }
  const __m256i eight = _mm256_set1_epi8(8);
  for (int b = 0; b < nb; ++b) {
    const __m256i q4 = _mm256_sub_epi8(UnpackNibbles(w[b].qs), eight);
    for (int t = 0; t < N; ++t) {
      const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t][b].qs));
      const __m256 p = _mm256_cvtepi32_ps(DotS8S8(q4, q8));
      acc[t] = _mm256_fmadd_ps(Fp16Pair(w[b].d, x[t][b].d), p, acc[t]);
    }
  }
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]);
}

template <int N>
void DotQ8_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ8_0*>(w_row);
  const BlockQ8_0* x[N];
  for (int t = 0; t < N; ++t) x[t] = reinterpret_cast<const BlockQ8_0*>(x_rows[t]);
  // |w| . (x with w's sign): unsigned x signed.
  auto dot = [&](__m256i qw, int t, int b) {
    const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t][b].qs));
    return DotU8S8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(q8, qw));
  };
  auto codes = [&](int b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
  };
#if defined(PSA_TILE_GEMM)  // the tile GEMM's arithmetic (kquant_gemm.h)
  simd::TileBlockRow<N, false>(
      nb, codes, dot, [&](int b) { return Fp16ToFp32(w[b].d); },
      [&](int t, int b) { return Fp16ToFp32(x[t][b].d); }, out);
#else
  __m256 acc[N];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const __m256i qw = codes(b);
    for (int t = 0; t < N; ++t) {
      const __m256 p = _mm256_cvtepi32_ps(dot(qw, t, b));
      acc[t] = _mm256_fmadd_ps(Fp16Pair(w[b].d, x[t][b].d), p, acc[t]);
    }
  }
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]);
#endif
}

#else  // scalar fallback

template <int N>
void DotQ4_1xQ8_1(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ4_1*>(w_row);
  for (int t = 0; t < N; ++t) {
    const auto* x = reinterpret_cast<const BlockQ8_1*>(x_rows[t]);
    float sum = 0;
    for (int b = 0; b < nb; ++b) {
      int s = 0;
      for (int j = 0; j < kQK / 2; ++j) {
        s += (w[b].qs[j] & 0xF) * x[b].qs[j] + (w[b].qs[j] >> 4) * x[b].qs[j + kQK / 2];
      }
      sum += Fp16ToFp32(w[b].d) * Fp16ToFp32(x[b].d) * s + Fp16ToFp32(w[b].m) * Fp16ToFp32(x[b].s);
    }
    out[t] = sum;
  }
}
template <int N>
void DotQ4_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ4_0*>(w_row);
  for (int t = 0; t < N; ++t) {
    const auto* x = reinterpret_cast<const BlockQ8_0*>(x_rows[t]);
    float sum = 0;
    for (int b = 0; b < nb; ++b) {
      int s = 0;
      for (int j = 0; j < kQK / 2; ++j) {
        s += ((w[b].qs[j] & 0xF) - 8) * x[b].qs[j] + ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + kQK / 2];
      }
      sum += Fp16ToFp32(w[b].d) * Fp16ToFp32(x[b].d) * s;
    }
    out[t] = sum;
  }
}
template <int N>
void DotQ8_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ8_0*>(w_row);
  for (int t = 0; t < N; ++t) {
    const auto* x = reinterpret_cast<const BlockQ8_0*>(x_rows[t]);
    float sum = 0;
    for (int b = 0; b < nb; ++b) {
      int s = 0;
      for (int j = 0; j < kQK; ++j) s += w[b].qs[j] * x[b].qs[j];
      sum += Fp16ToFp32(w[b].d) * Fp16ToFp32(x[b].d) * s;
    }
    out[t] = sum;
  }
}
#endif

// Dispatches one weight row against up to 4 activation rows.
template <int N>
void DotRows(GgmlType type, const uint8_t* w_row, const uint8_t* const* x_rows, int64_t cols,
             float* out) {
  const int nb = static_cast<int>(cols / kQK);
  const int nb_k = static_cast<int>(cols / kQK_K);  // K-quant super-blocks
  switch (type) {
    case GgmlType::kQ4_1: DotQ4_1xQ8_1<N>(w_row, x_rows, nb, out); return;
    case GgmlType::kQ4_0: DotQ4_0xQ8_0<N>(w_row, x_rows, nb, out); return;
    case GgmlType::kQ8_0: DotQ8_0xQ8_0<N>(w_row, x_rows, nb, out); return;
    case GgmlType::kQ5_0: DotQ5_0xQ8_0<N>(w_row, x_rows, nb, out); return;
    case GgmlType::kQ5_1: DotQ5_1xQ8_1<N>(w_row, x_rows, nb, out); return;
    case GgmlType::kQ4_K: DotQ4_KxQ8_K<N>(w_row, x_rows, nb_k, out); return;
    case GgmlType::kQ5_K: DotQ5_KxQ8_K<N>(w_row, x_rows, nb_k, out); return;
    case GgmlType::kQ6_K: DotQ6_KxQ8_K<N>(w_row, x_rows, nb_k, out); return;
    default: {
      // Float weights: decode the row, then plain fp32 dots.
      thread_local std::vector<float> row;
      row.resize(cols);
      DequantizeRow(type, w_row, row.data(), cols);
      for (int t = 0; t < N; ++t) {
        out[t] = DotF32(row.data(), reinterpret_cast<const float*>(x_rows[t]),
                        static_cast<int>(cols));
      }
    }
  }
}

// Fewest tokens for which the tile GEMM's unpacking pays off.
constexpr int kTileMinTokens = 16;

std::atomic<bool> tile_gemm_enabled{true};

}  // namespace

GgmlType ActivationTypeFor(GgmlType weight) {
  switch (weight) {
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_1: return GgmlType::kQ8_1;
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ8_0: return GgmlType::kQ8_0;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K: return GgmlType::kQ8_K;
    default: return GgmlType::kF32;
  }
}

void PackActivations(GgmlType weight, const float* x, int n, int64_t cols, int64_t ld,
                     PackedActivations* out) {
  out->type = ActivationTypeFor(weight);
  out->n = n;
  out->cols = cols;
  out->row_bytes = RowBytes(out->type, cols);
  out->data.resize(out->row_bytes * n);
  for (int i = 0; i < n; ++i) {
    QuantizeRow(out->type, x + i * ld, out->data.data() + i * out->row_bytes, cols);
  }
}

float DotRow(GgmlType weight_type, const uint8_t* w_row, const uint8_t* x_row, int64_t cols) {
  float out;
  DotRows<1>(weight_type, w_row, &x_row, cols, &out);
  return out;
}

void MatMul(const WeightMatrix& w, const PackedActivations& x, float* y, int64_t ldy,
            int64_t row_begin, int64_t row_end) {
  if (row_end < 0) row_end = w.rows;
  const int n = x.n;
  // Prefill-sized batches: whole 16-row tiles through the tile GEMM
  // (kquant_gemm.h), the rows after the last tile below.
  const int64_t tiles = (row_end - row_begin) / kTileRows;
  if (n >= kTileMinTokens && tiles > 0 && TileGemmSupports(w.type) &&
      tile_gemm_enabled.load(std::memory_order_relaxed)) {
    TileActivations side;  // shared by the threads below
    PrepareTileActivations(w.type, x.data.data(), x.row_bytes, n, w.cols, &side);
#pragma omp parallel for schedule(static) if (tiles > 1)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t r = row_begin + i * kTileRows;
      TileGemm16(w.type, w.row(r), w.row_bytes, x.data.data(), x.row_bytes, n, w.cols, side,
                 y + r, ldy);
    }
    row_begin += tiles * kTileRows;
  }
  constexpr int64_t kRowChunk = 16;
  const int64_t n_chunks = (row_end - row_begin + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t r0 = row_begin + c * kRowChunk;
    const int64_t r1 = std::min(row_end, r0 + kRowChunk);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* w_row = w.row(r);
      int t = 0;
      float out[4];
      for (; t + 4 <= n; t += 4) {
        const uint8_t* rows[4] = {x.row(t), x.row(t + 1), x.row(t + 2), x.row(t + 3)};
        DotRows<4>(w.type, w_row, rows, w.cols, out);
        for (int k = 0; k < 4; ++k) y[(t + k) * ldy + r] = out[k];
      }
      for (; t < n; ++t) {
        const uint8_t* rows[1] = {x.row(t)};
        DotRows<1>(w.type, w_row, rows, w.cols, out);
        y[t * ldy + r] = out[0];
      }
    }
  }
}

void SetTileGemmEnabled(bool on) { tile_gemm_enabled.store(on); }
bool TileGemmEnabled() { return tile_gemm_enabled.load(); }

const char* MatMulIsa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace psa
