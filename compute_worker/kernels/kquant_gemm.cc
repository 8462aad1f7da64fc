// Tile GEMM (see kquant_gemm.h). For Q4_K / Q6_K, per tile of 16 weight
// rows and super-block b:
//   Unpack:  codes[k][r] = the 4 codes 4k..4k+3 of row r (unsigned bytes),
//            scale[j][r] = sub-block j's integer scale, corr[i][r] = int16
//            pairs that multiply the activations' bsums 2i, 2i+1 (Q4_K: its
//            minimums, Q6_K: its scales, for the offset 32), d[r], dcorr[r].
//   Tokens:  per token, isum[r] = sum_j scale[j][r] * sum_{k in j} dpbusd,
//            icorr[r] = sum_i dpwssd(corr[i][r], bsums pair i), then
//            y[r] += dx * (d[r] * isum[r] - dcorr[r] * icorr[r]).
// Q5_0 / Q8_0 / Q4_1 use the same layout for groups of 8 blocks of 32 with
// per-block float scales (UnpackQ8Family below); block b's term goes into
// partial sum b % 4 and y[r] = (p0 + p1) + (p2 + p3), the order the row
// kernels can follow with four blocks per vector (quant_simd.h). Four tokens
// go together: four independent dpbusd chains per weight load.
#include "compute_worker/kernels/kquant_gemm.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(PSA_TILE_GEMM)
#include <immintrin.h>
#endif

#include "compute_worker/kernels/simd_warnings.h"

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa {

#if defined(PSA_TILE_GEMM)
namespace {

constexpr int kTokenBlock = 128;  // tokens sharing one unpacked super-block

// One super-block of 16 weight rows, unpacked (lane r = row r).
struct alignas(64) TileWeights {
  int32_t codes[64][kTileRows];
  int32_t scale[16][kTileRows];  // Q4_K: 8 sub-blocks of 32; Q6_K: 16 of 16
  int32_t corr[8][kTileRows];
  float d[kTileRows];
  float dcorr[kTileRows];
  float dblk[8][kTileRows];  // Q5_0 / Q8_0 / Q4_1: each 32-element block's scale
  float mblk[8][kTileRows];  // Q4_1: each block's minimum
};

inline int32_t Load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m256i Load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Dwords 0..15 of the 64 bytes (lo, hi) to codes[k0 + i][r].
inline void Scatter(TileWeights* tw, int k0, int r, __m256i lo, __m256i hi) {
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  const __m512i index = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(kTileRows));
  _mm512_i32scatter_epi32(&tw->codes[k0][r], index, v, 4);
}

void UnpackQ4_K(const uint8_t* w, size_t row_bytes, int b, TileWeights* tw) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < kTileRows; ++r) {
    const BlockQ4_K& blk = reinterpret_cast<const BlockQ4_K*>(w + r * row_bytes)[b];
    uint8_t sc[8], m[8];
    DecodeQ4KScales(blk.scales, sc, m);
    for (int j = 0; j < 8; ++j) {
      tw->scale[j][r] = sc[j];
      tw->corr[j][r] = m[j] | (m[j] << 16);  // times bsums 2j + 2j+1
    }
    tw->d[r] = Fp16ToFp32(blk.d);
    tw->dcorr[r] = Fp16ToFp32(blk.dmin);
    for (int c = 0; c < 4; ++c) {  // 64-element chunk: low nibbles, then high
      const __m256i raw = Load256(blk.qs + 32 * c);
      Scatter(tw, 16 * c, r, _mm256_and_si256(raw, low4),
              _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4));
    }
  }
}

void UnpackQ6_K(const uint8_t* w, size_t row_bytes, int b, TileWeights* tw) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  for (int r = 0; r < kTileRows; ++r) {
    const BlockQ6_K& blk = reinterpret_cast<const BlockQ6_K*>(w + r * row_bytes)[b];
    for (int g = 0; g < 16; ++g) tw->scale[g][r] = blk.scales[g];
    for (int i = 0; i < 8; ++i) {
      tw->corr[i][r] = static_cast<int32_t>(static_cast<uint16_t>(blk.scales[2 * i]) |
                                            (static_cast<uint32_t>(static_cast<uint16_t>(
                                                 blk.scales[2 * i + 1]))
                                             << 16));
    }
    const float d = Fp16ToFp32(blk.d);
    tw->d[r] = d;
    tw->dcorr[r] = 32 * d;  // codes are stored unsigned: code - 32
    for (int h = 0; h < 2; ++h) {  // halves of 128 elements (kquant_dot.cc's order)
      const __m256i l0 = Load256(blk.ql + 64 * h), l1 = Load256(blk.ql + 64 * h + 32);
      const __m256i qh = Load256(blk.qh + 32 * h);
      const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, low4),
                                         _mm256_and_si256(_mm256_slli_epi16(qh, 4), top2));
      const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                         _mm256_and_si256(_mm256_slli_epi16(qh, 2), top2));
      const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                         _mm256_and_si256(qh, top2));
      const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                         _mm256_and_si256(_mm256_srli_epi16(qh, 2), top2));
      Scatter(tw, 32 * h, r, q0, q1);
      Scatter(tw, 32 * h + 16, r, q2, q3);
    }
  }
}

// acc[t][0..15] += the tile's products with token t's super-block x[t],
// for TT tokens; sub-blocks of kSteps dwords (8: Q4_K, 4: Q6_K).
template <int TT, int kSteps>
inline void Tokens(const TileWeights& tw, const BlockQ8_K* const* x, float (*acc)[kTileRows]) {
  __m512i isum[TT], icorr[TT];
  for (int t = 0; t < TT; ++t) isum[t] = icorr[t] = _mm512_setzero_si512();
  for (int j = 0; j < 64 / kSteps; ++j) {
    __m512i s[TT];
    for (int t = 0; t < TT; ++t) s[t] = _mm512_setzero_si512();
    for (int k = 0; k < kSteps; ++k) {
      const int q = j * kSteps + k;
      const __m512i wv = _mm512_load_si512(tw.codes[q]);
      for (int t = 0; t < TT; ++t) {
        s[t] = _mm512_dpbusd_epi32(s[t], wv, _mm512_set1_epi32(Load32(x[t]->qs + 4 * q)));
      }
    }
    const __m512i sc = _mm512_load_si512(tw.scale[j]);
    for (int t = 0; t < TT; ++t) isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(s[t], sc));
  }
  for (int i = 0; i < 8; ++i) {
    const __m512i cv = _mm512_load_si512(tw.corr[i]);
    for (int t = 0; t < TT; ++t) {
      icorr[t] = _mm512_dpwssd_epi32(icorr[t], cv, _mm512_set1_epi32(Load32(x[t]->bsums + 2 * i)));
    }
  }
  const __m512 d = _mm512_load_ps(tw.d), dcorr = _mm512_load_ps(tw.dcorr);
  for (int t = 0; t < TT; ++t) {
    const __m512 v = _mm512_fmsub_ps(d, _mm512_cvtepi32_ps(isum[t]),
                                     _mm512_mul_ps(dcorr, _mm512_cvtepi32_ps(icorr[t])));
    _mm512_store_ps(acc[t], _mm512_fmadd_ps(_mm512_set1_ps(x[t]->d), v, _mm512_load_ps(acc[t])));
  }
}

template <int kSteps>
void Gemm(void (*unpack)(const uint8_t*, size_t, int, TileWeights*), const uint8_t* w,
          size_t w_row_bytes, const uint8_t* x, size_t x_row_bytes, int n, int64_t cols,
          float* y, int64_t ldy) {
  const int nb = static_cast<int>(cols / kQK_K);
  TileWeights tw;
  alignas(64) float acc[kTokenBlock][kTileRows];
  for (int t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int tb = std::min(kTokenBlock, n - t0);
    std::memset(acc, 0, sizeof(acc[0]) * tb);
    for (int b = 0; b < nb; ++b) {
      unpack(w, w_row_bytes, b, &tw);
      int t = 0;
      for (; t + 4 <= tb; t += 4) {
        const BlockQ8_K* xb[4];
        for (int i = 0; i < 4; ++i) {
          xb[i] = reinterpret_cast<const BlockQ8_K*>(x + (t0 + t + i) * x_row_bytes) + b;
        }
        Tokens<4, kSteps>(tw, xb, acc + t);
      }
      for (; t < tb; ++t) {
        const BlockQ8_K* xb[1] = {reinterpret_cast<const BlockQ8_K*>(x + (t0 + t) * x_row_bytes) +
                                  b};
        Tokens<1, kSteps>(tw, xb, acc + t);
      }
    }
    for (int t = 0; t < tb; ++t) _mm512_storeu_ps(y + (t0 + t) * ldy, _mm512_load_ps(acc[t]));
  }
}

// Q5_0 / Q8_0 (32-element blocks, Q8_0 activations): the codes are stored
// unsigned, value + kOffset (16 for Q5_0, 128 for Q8_0), and kOffset times
// the activation block's code sum (TileActivations) comes off again. Q4_1
// (Q8_1 activations): codes 0..15, plus its minimum times the activation
// block's sum (Q8_1's s). A group of up to 8 blocks is unpacked at a time,
// in TileWeights' layout.
template <GgmlType kType>
void UnpackQ8Family(const uint8_t* w, size_t row_bytes, int b0, int nblk, TileWeights* tw) {
  const __m256i index = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm256_set1_epi32(kTileRows));
  for (int r = 0; r < kTileRows; ++r) {
    for (int i = 0; i < nblk; ++i) {
      __m256i q;
      uint16_t d;
      if constexpr (kType == GgmlType::kQ5_0) {
        const BlockQ5_0& blk = reinterpret_cast<const BlockQ5_0*>(w + r * row_bytes)[b0 + i];
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs));
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                             _mm256_set1_epi8(0x0F));
        const __m256i fifth = _mm256_and_si256(_mm256_movm_epi8(Load32(blk.qh)),
                                               _mm256_set1_epi8(0x10));
        q = _mm256_or_si256(nib, fifth);
        d = blk.d;
      } else if constexpr (kType == GgmlType::kQ4_1) {
        const BlockQ4_1& blk = reinterpret_cast<const BlockQ4_1*>(w + r * row_bytes)[b0 + i];
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs));
        q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                             _mm256_set1_epi8(0x0F));
        d = blk.d;
        tw->mblk[i][r] = Fp16ToFp32(blk.m);
      } else {
        const BlockQ8_0& blk = reinterpret_cast<const BlockQ8_0*>(w + r * row_bytes)[b0 + i];
        q = _mm256_xor_si256(Load256(blk.qs), _mm256_set1_epi8(static_cast<char>(0x80)));
        d = blk.d;
      }
      tw->dblk[i][r] = Fp16ToFp32(d);
      _mm256_i32scatter_epi32(&tw->codes[8 * i][r], index, q, 4);
    }
  }
}

// xs: the code sums (kOffset > 0) or, for Q8_1 activations, the float sums.
// Block b goes into partial sum b % 4 (b0 is a multiple of 8), as the row
// kernels do it (quant_simd.h, TileBlockSums).
template <int TT, int kOffset, typename XBlock, typename Sum>
inline void TokensQ8(const TileWeights& tw, int nblk, const XBlock* const* x,
                     const float* const* xd, const Sum* const* xs, float (*acc)[4][kTileRows]) {
  __m512 a[TT][4];
  for (int t = 0; t < TT; ++t) {
    for (int j = 0; j < 4; ++j) a[t][j] = _mm512_load_ps(acc[t][j]);
  }
  for (int i = 0; i < nblk; ++i) {
    __m512i s[TT];
    for (int t = 0; t < TT; ++t) {
      if constexpr (kOffset != 0) {
        s[t] = _mm512_set1_epi32(-kOffset * xs[t][i]);
      } else {
        s[t] = _mm512_setzero_si512();
      }
    }
    for (int k = 0; k < 8; ++k) {
      const __m512i wv = _mm512_load_si512(tw.codes[8 * i + k]);
      for (int t = 0; t < TT; ++t) {
        s[t] = _mm512_dpbusd_epi32(s[t], wv, _mm512_set1_epi32(Load32(x[t][i].qs + 4 * k)));
      }
    }
    const __m512 dw = _mm512_load_ps(tw.dblk[i]);
    const int j = i % 4;
    for (int t = 0; t < TT; ++t) {
      a[t][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]),
                                _mm512_mul_ps(dw, _mm512_set1_ps(xd[t][i])), a[t][j]);
    }
    if constexpr (kOffset == 0) {
      const __m512 mw = _mm512_load_ps(tw.mblk[i]);
      for (int t = 0; t < TT; ++t) a[t][j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[t][i]), a[t][j]);
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int j = 0; j < 4; ++j) _mm512_store_ps(acc[t][j], a[t][j]);
  }
}

template <GgmlType kType, int kOffset, typename XBlock = BlockQ8_0>
void GemmQ8Family(const uint8_t* w, size_t w_row_bytes, const uint8_t* x, size_t x_row_bytes,
                  int n, int64_t cols, const TileActivations& side, float* y, int64_t ldy) {
  const int nb = static_cast<int>(cols / kQK);
  TileWeights tw;
  alignas(64) float acc[kTokenBlock][4][kTileRows];  // partial sums by block % 4
  auto blocks = [&](int t) { return reinterpret_cast<const XBlock*>(x + t * x_row_bytes); };
  using Sum = std::conditional_t<kOffset == 0, float, int32_t>;
  const Sum* sums;
  if constexpr (kOffset == 0) {
    sums = side.s.data();
  } else {
    sums = side.sum.data();
  }
  for (int t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int tb = std::min(kTokenBlock, n - t0);
    std::memset(acc, 0, sizeof(acc[0]) * tb);
    for (int b0 = 0; b0 < nb; b0 += 8) {
      const int nblk = std::min(8, nb - b0);
      UnpackQ8Family<kType>(w, w_row_bytes, b0, nblk, &tw);
      int t = 0;
      for (; t + 4 <= tb; t += 4) {
        const XBlock* xb[4];
        const float* xd[4];
        const Sum* xs[4];
        for (int i = 0; i < 4; ++i) {
          const size_t at = static_cast<size_t>(t0 + t + i) * nb + b0;
          xb[i] = blocks(t0 + t + i) + b0;
          xd[i] = side.d.data() + at;
          xs[i] = sums + at;
        }
        TokensQ8<4, kOffset>(tw, nblk, xb, xd, xs, acc + t);
      }
      for (; t < tb; ++t) {
        const size_t at = static_cast<size_t>(t0 + t) * nb + b0;
        const XBlock* xb[1] = {blocks(t0 + t) + b0};
        const float* xd[1] = {side.d.data() + at};
        const Sum* xs[1] = {sums + at};
        TokensQ8<1, kOffset>(tw, nblk, xb, xd, xs, acc + t);
      }
    }
    for (int t = 0; t < tb; ++t) {
      const __m512 p01 = _mm512_add_ps(_mm512_load_ps(acc[t][0]), _mm512_load_ps(acc[t][1]));
      const __m512 p23 = _mm512_add_ps(_mm512_load_ps(acc[t][2]), _mm512_load_ps(acc[t][3]));
      _mm512_storeu_ps(y + (t0 + t) * ldy, _mm512_add_ps(p01, p23));
    }
  }
}

}  // namespace

bool TileGemmSupports(GgmlType type) {
  return type == GgmlType::kQ4_K || type == GgmlType::kQ6_K || type == GgmlType::kQ5_0 ||
         type == GgmlType::kQ8_0 || type == GgmlType::kQ4_1;
}

void PrepareTileActivations(GgmlType weight, const uint8_t* x, size_t x_row_bytes, int n,
                            int64_t cols, TileActivations* out) {
  const int nb = static_cast<int>(cols / kQK);
  if (weight == GgmlType::kQ4_1) {  // Q8_1: the float scale and sum
    out->d.resize(static_cast<size_t>(n) * nb);
    out->s.resize(static_cast<size_t>(n) * nb);
    for (int t = 0; t < n; ++t) {
      const auto* blk = reinterpret_cast<const BlockQ8_1*>(x + t * x_row_bytes);
      for (int b = 0; b < nb; ++b) {
        out->d[static_cast<size_t>(t) * nb + b] = Fp16ToFp32(blk[b].d);
        out->s[static_cast<size_t>(t) * nb + b] = Fp16ToFp32(blk[b].s);
      }
    }
    return;
  }
  if (weight != GgmlType::kQ5_0 && weight != GgmlType::kQ8_0) return;
  out->d.resize(static_cast<size_t>(n) * nb);
  out->sum.resize(static_cast<size_t>(n) * nb);
  const __m256i ones = _mm256_set1_epi8(1);
  for (int t = 0; t < n; ++t) {
    const auto* blk = reinterpret_cast<const BlockQ8_0*>(x + t * x_row_bytes);
    for (int b = 0; b < nb; ++b) {
      const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, Load256(blk[b].qs));
      out->d[static_cast<size_t>(t) * nb + b] = Fp16ToFp32(blk[b].d);
      out->sum[static_cast<size_t>(t) * nb + b] = _mm512_reduce_add_epi32(_mm512_zextsi256_si512(s));
    }
  }
}

void TileGemm16(GgmlType type, const uint8_t* w, size_t w_row_bytes, const uint8_t* x,
                size_t x_row_bytes, int n, int64_t cols, const TileActivations& side, float* y,
                int64_t ldy) {
  if (type == GgmlType::kQ5_0) {
    GemmQ8Family<GgmlType::kQ5_0, 16>(w, w_row_bytes, x, x_row_bytes, n, cols, side, y, ldy);
  } else if (type == GgmlType::kQ4_1) {
    GemmQ8Family<GgmlType::kQ4_1, 0, BlockQ8_1>(w, w_row_bytes, x, x_row_bytes, n, cols, side, y,
                                               ldy);
  } else if (type == GgmlType::kQ8_0) {
    GemmQ8Family<GgmlType::kQ8_0, 128>(w, w_row_bytes, x, x_row_bytes, n, cols, side, y, ldy);
  } else if (type == GgmlType::kQ4_K) {
    Gemm<8>(UnpackQ4_K, w, w_row_bytes, x, x_row_bytes, n, cols, y, ldy);
  } else {
    Gemm<4>(UnpackQ6_K, w, w_row_bytes, x, x_row_bytes, n, cols, y, ldy);
  }
}

#else  // no AVX-512 VNNI: MatMul uses the per-row kernels

bool TileGemmSupports(GgmlType) { return false; }

void PrepareTileActivations(GgmlType, const uint8_t*, size_t, int, int64_t, TileActivations*) {}

void TileGemm16(GgmlType, const uint8_t*, size_t, const uint8_t*, size_t, int, int64_t,
                const TileActivations&, float*, int64_t) {}

#endif

}  // namespace psa

PSA_END_AVX512_CODE
