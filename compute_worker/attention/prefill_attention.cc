#include "compute_worker/attention/prefill_attention.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/model/llama_model.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

PSA_BEGIN_AVX512_CODE

namespace psa {
namespace {

// Keys (and values) per tile: a multiple of 16; as fp32, 32 KiB (head dim
// 64) or 64 KiB (128), in L1/L2 while every (row, head) of a row tile uses
// them.
constexpr int kKeyTile = 128;
// Scores kept per row tile ((rows x heads) x keys floats): small enough to
// stay in L2 between the score, softmax and value passes.
constexpr size_t kScoreBudget = size_t{1} << 18;
constexpr int kMaxRowTile = 32;

inline int RoundUp16(int n) { return (n + 15) & ~15; }

// Rows [t0, t1) of `rows` as fp32 at dst (t0 - t0-relative), then zero
// rows up to the next multiple of 16.
void ConvertRows(const KvRows& rows, int t0, int t1, float* dst) {
  const int d = rows.dim, B = rows.block_size;
  for (int t = t0; t < t1;) {
    const int n = std::min(t1, (t / B + 1) * B) - t;  // contiguous within a block
    Fp16RowToFp32(rows.row(t), dst + static_cast<size_t>(t - t0) * d, n * d);
    t += n;
  }
  const int padded = t0 + RoundUp16(t1 - t0);
  std::fill(dst + static_cast<size_t>(t1 - t0) * d, dst + static_cast<size_t>(padded - t0) * d, 0.0f);
}

#if defined(__AVX512F__)
// s[t] = scale * DotF32(q, k_t) for keys [0, n) of kf (zero-padded to a
// multiple of 16 rows).
template <int D>
void ScoresF32(const float* q16, const float* kf, int n, float scale, float* s) {
  __m512 q[D / 16];
  for (int c = 0; c < D / 16; ++c) q[c] = _mm512_loadu_ps(q16 + 16 * c);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int t = 0; t < n; t += 16) {
    _mm512_mask_storeu_ps(s + t, FirstLanes(n - t),
                          _mm512_mul_ps(DotF32x16<D>(q, kf + static_cast<size_t>(t) * D), vscale));
  }
}

#endif

}  // namespace

void TiledPrefillAttention(const AttentionShape& shape, const AttentionTask& task,
                           const KvRows& keys, const KvRows& values) {
  const int d = shape.head_dim, G = shape.group();
  const int n_q = task.n_q, q_pos0 = task.q_pos0;
  const int n_keys_task = q_pos0 + n_q;
  // The single-row path's choices (attention.cc): head dim 64 with up to 4
  // heads scores 16 keys at a time straight from fp16 blocks of a multiple
  // of 16 rows, a row's last n % 16 keys with DotF32; everything else with
  // DotF32.
#if defined(__AVX512F__)
  const bool dot16 = d == 64 && G <= 4 && keys.block_size % 16 == 0;
  const bool simd = d == 64 || d == 128;
#endif
  const int rows_tile = static_cast<int>(std::clamp<size_t>(
      kScoreBudget / (static_cast<size_t>(G) * RoundUp16(n_keys_task)), 1, kMaxRowTile));

  thread_local std::vector<float> scores, q16, kf, vf, tail;
  thread_local std::vector<float> inv;
  thread_local std::vector<const float*> pp;
  thread_local std::vector<float*> op;
  kf.resize(static_cast<size_t>(kKeyTile) * d);
  vf.resize(static_cast<size_t>(kKeyTile) * d);
  tail.resize(static_cast<size_t>(16) * d);
  q16.resize(static_cast<size_t>(rows_tile) * G * d);
  inv.resize(static_cast<size_t>(rows_tile) * G);
  pp.resize(G);
  op.resize(G);

  for (int r0 = 0; r0 < n_q; r0 += rows_tile) {
    const int nr = std::min(rows_tile, n_q - r0);
    const int n_max = q_pos0 + r0 + nr;  // keys the tile reads
    const int n_min = q_pos0 + r0 + 1;   // keys of its first row
    const size_t ld = RoundUp16(n_max);
    scores.resize(static_cast<size_t>(nr) * G * ld);
    auto S = [&](int i, int g) { return scores.data() + (static_cast<size_t>(i) * G + g) * ld; };
    auto Q = [&](int i, int g) { return q16.data() + (static_cast<size_t>(i) * G + g) * d; };
    auto Out = [&](int i, int g) {
      return task.out + static_cast<size_t>(r0 + i) * task.out_stride + static_cast<size_t>(g) * d;
    };
    for (int i = 0; i < nr; ++i) {
      for (int g = 0; g < G; ++g) {
        const float* q = task.q + static_cast<size_t>(r0 + i) * task.q_stride + g * d;
        float* q_16 = Q(i, g);
        for (int k = 0; k < d; ++k) q_16[k] = RoundToFp16(q[k]);
      }
    }

    // Scores, a tile of keys at a time.
    for (int t0 = 0; t0 < n_max; t0 += kKeyTile) {
      const int t1 = std::min(n_max, t0 + kKeyTile);
#if defined(__AVX512F__)
      if (dot16) {
        const __m512 vscale = _mm512_set1_ps(shape.scale);
        for (int i = 0; i < nr; ++i) {
          const int n_i = n_min + i;
          if (n_i <= t0) continue;  // rows ascend in n_i: later ones may reach t0
          const int lim = std::min(t1, n_i), full = std::min(lim, n_i / 16 * 16);
          const float* qs[4];
          for (int g = 0; g < G; ++g) qs[g] = Q(i, g);
          for (int t = t0; t < full; t += 16) {
            __m512 dots[4];
            WithGroup(G, [&](auto kg) {
              Dot16RowsFp16x64<decltype(kg)::value>(qs, keys.row(t), dots);
            });
            for (int g = 0; g < G; ++g) _mm512_storeu_ps(S(i, g) + t, _mm512_mul_ps(dots[g], vscale));
          }
          if (full < lim) {  // the row's last n % 16 keys, as DotF32
            const int tb = std::max(t0, full);
            ConvertRows(keys, tb, lim, tail.data());
            for (int g = 0; g < G; ++g) ScoresF32<64>(Q(i, g), tail.data(), lim - tb, shape.scale, S(i, g) + tb);
          }
        }
        continue;
      }
#endif
      ConvertRows(keys, t0, t1, kf.data());
      for (int i = 0; i < nr; ++i) {
        const int n_i = n_min + i;
        if (n_i <= t0) continue;  // rows ascend in n_i: later ones may reach t0
        const int lim = std::min(t1, n_i);
        for (int g = 0; g < G; ++g) {
          float* s = S(i, g) + t0;
#if defined(__AVX512F__)
          if (simd) {
            if (d == 64) {
              ScoresF32<64>(Q(i, g), kf.data(), lim - t0, shape.scale, s);
            } else {
              ScoresF32<128>(Q(i, g), kf.data(), lim - t0, shape.scale, s);
            }
            continue;
          }
#endif
          for (int t = 0; t < lim - t0; ++t) {
            s[t] = DotF32(Q(i, g), kf.data() + static_cast<size_t>(t) * d, d) * shape.scale;
          }
        }
      }
    }

    // Softmax of each (row, head): the single-row path's calls.
    for (int i = 0; i < nr; ++i) {
      const int n_i = n_min + i;
      for (int g = 0; g < G; ++g) {
        float* s = S(i, g);
        const double sum = ExpShiftSum(s, n_i, MaxF32(s, n_i));
        inv[static_cast<size_t>(i) * G + g] = static_cast<float>(1.0 / sum);
        std::fill(Out(i, g), Out(i, g) + d, 0.0f);
      }
    }

    // Values, a tile of keys at a time; each (row, head) sums its keys in
    // order, continuing from where the previous tile left it.
    for (int t0 = 0; t0 < n_max; t0 += kKeyTile) {
      const int t1 = std::min(n_max, t0 + kKeyTile);
      ConvertRows(values, t0, t1, vf.data());
      for (int i = 0; i < nr; ++i) {
        const int n_i = n_min + i;
        if (n_i <= t0) continue;  // rows ascend in n_i: later ones may reach t0
        const int lim = std::min(t1, n_i);
        for (int g = 0; g < G; ++g) {
          float* s = S(i, g) + t0;
          ScaleRoundToFp16(inv[static_cast<size_t>(i) * G + g], s, lim - t0);
          pp[g] = s;
          op[g] = Out(i, g);
        }
#if defined(__AVX512F__)
        if (d == 64) {
          AccumulateHeads<64>(vf.data(), lim - t0, pp.data(), op.data(), G);
          continue;
        }
        if (d == 128) {
          AccumulateHeads<128>(vf.data(), lim - t0, pp.data(), op.data(), G);
          continue;
        }
#endif
        for (int t = 0; t < lim - t0; ++t) {
          const float* v = vf.data() + static_cast<size_t>(t) * d;
          for (int g = 0; g < G; ++g) AxpyF32(pp[g][t], v, op[g], d);
        }
      }
    }
  }
}

namespace {
std::atomic<bool> tiled_prefill_enabled{true};
}  // namespace

void SetTiledPrefillAttentionEnabled(bool on) { tiled_prefill_enabled.store(on); }
bool TiledPrefillAttentionEnabled() { return tiled_prefill_enabled.load(); }

}  // namespace psa

PSA_END_AVX512_CODE
