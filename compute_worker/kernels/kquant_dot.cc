// AVX2 kernels for Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K weights. Each weight
// block (super-block for the K-quants) is unpacked into 32-byte vectors of
// codes once and then multiplied with every activation row; the scalar
// kernels (kquant_dot_scalar.cc) run where the build has no AVX2.
#include "compute_worker/kernels/kquant_dot.h"

#include <cstring>

#include "compute_worker/kernels/quant_simd.h"
#include "compute_worker/kernels/simd_warnings.h"

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa {
namespace {

#if defined(__AVX2__)

using simd::BitsToBytes;
using simd::DotS8S8;
using simd::DotU8S8;
using simd::Fp16Pair;
using simd::HorizontalSum;
using simd::MaddAcc;
using simd::UnpackNibbles;

inline __m256i Load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

uint32_t LoadQh(const uint8_t qh[4]) {
  uint32_t v;
  std::memcpy(&v, qh, 4);
  return v;
}

// A Q4_K / Q5_K super-block's 6-bit scales and minimums (DecodeQ4KScales'
// rule, four bytes at a time) as bytes sc[0..7], m[0..7].
inline __m128i ScalesAndMins(const uint8_t s[12]) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4);
  std::memcpy(&b, s + 4, 4);
  std::memcpy(&c, s + 8, 4);
  const uint32_t sc_lo = a & 0x3f3f3f3f, m_lo = b & 0x3f3f3f3f;
  // Sub-blocks 4..7: low 4 bits from c, top 2 from bits 6-7 of a (sc), b (m).
  const uint32_t sc_hi = (c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030);
  const uint32_t m_hi = ((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030);
  return _mm_set_epi32(static_cast<int>(m_hi), static_cast<int>(m_lo), static_cast<int>(sc_hi),
                       static_cast<int>(sc_lo));
}

template <int N>
void AvxQ5_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ5_0*>(w_row);
  const BlockQ8_0* x[N];
  for (int t = 0; t < N; ++t) x[t] = reinterpret_cast<const BlockQ8_0*>(x_rows[t]);
  // code - 16 is the nibble where the fifth bit is set and nibble - 16,
  // i.e. nibble | 0xF0 as a signed byte, where it is clear.
  const __m256i top = _mm256_set1_epi8(static_cast<char>(0xF0));
  auto codes = [&](int b) {
    return _mm256_or_si256(UnpackNibbles(w[b].qs),
                           _mm256_andnot_si256(BitsToBytes(LoadQh(w[b].qh)), top));
  };
#if defined(PSA_TILE_GEMM)  // the tile GEMM's arithmetic (kquant_gemm.h)
  simd::TileBlockRow<N, false>(
      nb, codes, [&](__m256i q, int t, int b) { return DotS8S8(q, Load256(x[t][b].qs)); },
      [&](int b) { return Fp16ToFp32(w[b].d); },
      [&](int t, int b) { return Fp16ToFp32(x[t][b].d); }, out);
#else
  __m256 acc[N];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const __m256i q = codes(b);
    for (int t = 0; t < N; ++t) {
      const __m256 p = _mm256_cvtepi32_ps(DotS8S8(q, Load256(x[t][b].qs)));
      acc[t] = _mm256_fmadd_ps(Fp16Pair(w[b].d, x[t][b].d), p, acc[t]);
    }
  }
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]);
#endif
}

template <int N>
void AvxQ5_1(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ5_1*>(w_row);
  const BlockQ8_1* x[N];
  __m256 acc[N];
  float mins[N];
  for (int t = 0; t < N; ++t) {
    x[t] = reinterpret_cast<const BlockQ8_1*>(x_rows[t]);
    acc[t] = _mm256_setzero_ps();
    mins[t] = 0;
  }
  const __m256i fifth = _mm256_set1_epi8(0x10);
  for (int b = 0; b < nb; ++b) {
    const __m256i q = _mm256_or_si256(UnpackNibbles(w[b].qs),
                                      _mm256_and_si256(BitsToBytes(LoadQh(w[b].qh)), fifth));
    const float dw = Fp16ToFp32(w[b].d), mw = Fp16ToFp32(w[b].m);
    for (int t = 0; t < N; ++t) {
      const __m256 p = _mm256_cvtepi32_ps(DotU8S8(q, Load256(x[t][b].qs)));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * Fp16ToFp32(x[t][b].d)), p, acc[t]);
      mins[t] += mw * Fp16ToFp32(x[t][b].s);
    }
  }
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]) + mins[t];
}

// Q4_K (kFifthBit false) and Q5_K. Per super-block and row:
//   d * dx * sum_j sc_j * dot(q_j, x_j)  -  dmin * dx * sum_j m_j * sum(x_j),
// the second from the activations' bsums, so no code needs its minimum.
template <int N, bool kFifthBit, typename Block>
void AvxAffineK(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const Block*>(w_row);
  const BlockQ8_K* x[N];
#if defined(PSA_TILE_GEMM)
  simd::TileSuperBlockSums<N> tile;  // the tile GEMM's arithmetic (kquant_gemm.h)
#else
  __m256 acc[N];
  for (__m256& a : acc) a = _mm256_setzero_ps();
#endif
  for (int t = 0; t < N; ++t) x[t] = reinterpret_cast<const BlockQ8_K*>(x_rows[t]);
  const __m256i low4 = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
  // Bytes 8,8,9,9,...,15,15: each sub-block's minimum for its two bsums.
  const __m128i pairs = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  for (int b = 0; b < nb; ++b) {
    const __m128i sm = ScalesAndMins(w[b].scales);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, pairs));
    // sc[0..7] as int16 in both 128-bit lanes; sub-block j's scale is then
    // one byte shuffle (bytes 2j, 2j+1) away.
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
    __m256i hbits;
    if constexpr (kFifthBit) hbits = Load256(w[b].qh);
    // Even and odd sub-blocks accumulate apart: two shorter dependency chains.
    __m256i isum[N], isum_odd[N];
    for (int t = 0; t < N; ++t) isum[t] = isum_odd[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {  // 64-element chunks: sub-blocks 2c, 2c+1
      const __m256i raw = Load256(w[b].qs + 32 * c);
      __m256i lo = _mm256_and_si256(raw, low4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      if constexpr (kFifthBit) {  // bit 2c of qh[l] -> 0x10 of element l, 2c+1 of 32+l
        const __m256i h = _mm256_srli_epi16(hbits, 2 * c);
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), fifth));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), fifth));
      }
      const __m256i sc_lo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((4 * c + 1) << 8 | 4 * c));
      const __m256i sc_hi =
          _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((4 * c + 3) << 8 | (4 * c + 2)));
      for (int t = 0; t < N; ++t) {
        const int8_t* q8 = x[t][b].qs + 64 * c;
        isum[t] = MaddAcc(isum[t], _mm256_maddubs_epi16(lo, Load256(q8)), sc_lo);
        isum_odd[t] = MaddAcc(isum_odd[t], _mm256_maddubs_epi16(hi, Load256(q8 + 32)), sc_hi);
      }
    }
    const float d = Fp16ToFp32(w[b].d), dmin = Fp16ToFp32(w[b].dmin);
#if defined(PSA_TILE_GEMM)
    __m256i total[N], imin[N];
    float dx[N];
    for (int t = 0; t < N; ++t) {
      imin[t] = _mm256_madd_epi16(Load256(x[t][b].bsums), mins16);
      total[t] = _mm256_add_epi32(isum[t], isum_odd[t]);
      dx[t] = x[t][b].d;
    }
    tile.Add(total, imin, d, dmin, dx);
#else
    for (int t = 0; t < N; ++t) {
      const __m256i imin = _mm256_madd_epi16(Load256(x[t][b].bsums), mins16);
      const float dx = x[t][b].d;
      const __m256i total = _mm256_add_epi32(isum[t], isum_odd[t]);
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(total), acc[t]);
      acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(imin), acc[t]);
    }
#endif
  }
#if defined(PSA_TILE_GEMM)
  tile.Finish(out);
#else
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]);
#endif
}

// Q6_K: codes are used as unsigned 0..63 and the offset 32 comes back as
// 32 * sum_g scale_g * bsum_g (its 16-element groups are the bsums' groups).
template <int N>
void AvxQ6_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
  const auto* w = reinterpret_cast<const BlockQ6_K*>(w_row);
  const BlockQ8_K* x[N];
#if defined(PSA_TILE_GEMM)
  simd::TileSuperBlockSums<N> tile;  // the tile GEMM's arithmetic (kquant_gemm.h)
#else
  __m256 acc[N];
  for (__m256& a : acc) a = _mm256_setzero_ps();
#endif
  for (int t = 0; t < N; ++t) x[t] = reinterpret_cast<const BlockQ8_K*>(x_rows[t]);
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  for (int b = 0; b < nb; ++b) {
    const int8_t* sc = w[b].scales;
    const __m256i sc16 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    __m256i isum[N], isum_odd[N];  // even and odd chunks: shorter chains
    for (int t = 0; t < N; ++t) isum[t] = isum_odd[t] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {  // halves of 128 elements: 4 chunks of 32
      const __m256i l0 = Load256(w[b].ql + 64 * h), l1 = Load256(w[b].ql + 64 * h + 32);
      const __m256i qh = Load256(w[b].qh + 32 * h);
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, low4),
                          _mm256_and_si256(_mm256_slli_epi16(qh, 4), top2)),
          _mm256_or_si256(_mm256_and_si256(l1, low4),
                          _mm256_and_si256(_mm256_slli_epi16(qh, 2), top2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                          _mm256_and_si256(qh, top2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), top2)),
      };
      for (int k = 0; k < 4; ++k) {
        // Elements 32 * chunk onwards: scale 2 * chunk for the first 16,
        // 2 * chunk + 1 for the next (the lower and upper 128-bit lanes).
        const int chunk = 4 * h + k;
        const __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[2 * chunk + 1]),
                                           _mm_set1_epi16(sc[2 * chunk]));
        for (int t = 0; t < N; ++t) {
          const __m256i p = _mm256_maddubs_epi16(q[k], Load256(x[t][b].qs + 32 * chunk));
          if (k % 2 == 0) {
            isum[t] = MaddAcc(isum[t], p, s);
          } else {
            isum_odd[t] = MaddAcc(isum_odd[t], p, s);
          }
        }
      }
    }
    const float d = Fp16ToFp32(w[b].d);
#if defined(PSA_TILE_GEMM)
    // The tile keeps the codes unsigned: d * sum - 32 d * offset.
    __m256i unsigned_sum[N], offset[N];
    float dx[N];
    for (int t = 0; t < N; ++t) {
      offset[t] = _mm256_madd_epi16(Load256(x[t][b].bsums), sc16);
      unsigned_sum[t] = _mm256_add_epi32(isum[t], isum_odd[t]);
      dx[t] = x[t][b].d;
    }
    tile.Add(unsigned_sum, offset, d, 32 * d, dx);
#else
    for (int t = 0; t < N; ++t) {
      const __m256i offset = _mm256_madd_epi16(Load256(x[t][b].bsums), sc16);
      const __m256i total = _mm256_sub_epi32(_mm256_add_epi32(isum[t], isum_odd[t]),
                                             _mm256_slli_epi32(offset, 5));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[t][b].d), _mm256_cvtepi32_ps(total), acc[t]);
    }
#endif
  }
#if defined(PSA_TILE_GEMM)
  tile.Finish(out);
#else
  for (int t = 0; t < N; ++t) out[t] = HorizontalSum(acc[t]);
#endif
}

#else

// Without AVX2: the scalar kernels, one activation row at a time.
template <int N>
void ScalarRows(GgmlType type, const uint8_t* w_row, const uint8_t* const* x_rows, int nb,
                float* out) {
  const int64_t cols = static_cast<int64_t>(nb) * BlockElements(type);
  for (int t = 0; t < N; ++t) out[t] = ScalarKQuantDot(type, w_row, x_rows[t], cols);
}

#endif

}  // namespace

template <int N>
void DotQ5_0xQ8_0(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
#if defined(__AVX2__)
  AvxQ5_0<N>(w_row, x_rows, nb, out);
#else
  ScalarRows<N>(GgmlType::kQ5_0, w_row, x_rows, nb, out);
#endif
}

template <int N>
void DotQ5_1xQ8_1(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
#if defined(__AVX2__)
  AvxQ5_1<N>(w_row, x_rows, nb, out);
#else
  ScalarRows<N>(GgmlType::kQ5_1, w_row, x_rows, nb, out);
#endif
}

template <int N>
void DotQ4_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
#if defined(__AVX2__)
  AvxAffineK<N, false, BlockQ4_K>(w_row, x_rows, nb, out);
#else
  ScalarRows<N>(GgmlType::kQ4_K, w_row, x_rows, nb, out);
#endif
}

template <int N>
void DotQ5_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
#if defined(__AVX2__)
  AvxAffineK<N, true, BlockQ5_K>(w_row, x_rows, nb, out);
#else
  ScalarRows<N>(GgmlType::kQ5_K, w_row, x_rows, nb, out);
#endif
}

template <int N>
void DotQ6_KxQ8_K(const uint8_t* w_row, const uint8_t* const* x_rows, int nb, float* out) {
#if defined(__AVX2__)
  AvxQ6_K<N>(w_row, x_rows, nb, out);
#else
  ScalarRows<N>(GgmlType::kQ6_K, w_row, x_rows, nb, out);
#endif
}

#define PSA_INSTANTIATE_KQUANT_DOT(N)                                                       \
  template void DotQ5_0xQ8_0<N>(const uint8_t*, const uint8_t* const*, int, float*);      \
  template void DotQ5_1xQ8_1<N>(const uint8_t*, const uint8_t* const*, int, float*);      \
  template void DotQ4_KxQ8_K<N>(const uint8_t*, const uint8_t* const*, int, float*);      \
  template void DotQ5_KxQ8_K<N>(const uint8_t*, const uint8_t* const*, int, float*);      \
  template void DotQ6_KxQ8_K<N>(const uint8_t*, const uint8_t* const*, int, float*);
PSA_INSTANTIATE_KQUANT_DOT(1)
PSA_INSTANTIATE_KQUANT_DOT(4)
#undef PSA_INSTANTIATE_KQUANT_DOT

}  // namespace psa

PSA_END_AVX512_CODE
