#include "compute_worker/model/ggml_kquants.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace psa {
namespace {

constexpr int kSubBlocks = kQK_K / 32;  // Q4_K / Q5_K sub-blocks of 32
constexpr int kGroups = kQK_K / 16;     // Q6_K sub-blocks and Q8_K bsums, of 16

// The smallest fp16 >= x (x >= 0, finite), capped at the largest finite half.
// The simple quantisers round their scales up so that no value clips.
uint16_t Fp16RoundUp(float x) {
  uint16_t h = Fp32ToFp16(x);
  if (Fp16ToFp32(h) < x) ++h;  // next half up: x > 0, so h is positive
  return std::min<uint16_t>(h, 0x7bff);
}

void EncodeQ4KScales(const uint8_t sc[8], const uint8_t m[8], uint8_t s[12]) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
  }
}

// One Q4_K / Q5_K super-block (nmax 15 or 31) of 8 sub-blocks: value =
// d * sc[j] * q - dmin * m[j]. Minimums are min(0, smallest value), so
// m >= 0 as the format needs. dmin and then d are chosen (rounded up to fp16)
// so the largest offset and step fit 6 bits; each sub-block's m and sc are
// rounded up so its range is covered, and codes round to nearest.
void QuantizeAffineK(const float* x, int nmax, uint16_t* d_out, uint16_t* dmin_out,
                     uint8_t scales[12], uint8_t codes[kQK_K]) {
  float lo[kSubBlocks], hi[kSubBlocks], max_off = 0;
  for (int j = 0; j < kSubBlocks; ++j) {
    lo[j] = 0;
    hi[j] = x[32 * j];
    for (int l = 0; l < 32; ++l) {
      lo[j] = std::min(lo[j], x[32 * j + l]);
      hi[j] = std::max(hi[j], x[32 * j + l]);
    }
    max_off = std::max(max_off, -lo[j]);
  }
  const uint16_t dmin16 = Fp16RoundUp(max_off / 63);
  const float dmin = Fp16ToFp32(dmin16);
  uint8_t sc[kSubBlocks], m[kSubBlocks];
  float off[kSubBlocks], step[kSubBlocks], max_step = 0;
  for (int j = 0; j < kSubBlocks; ++j) {
    m[j] = dmin > 0 ? static_cast<uint8_t>(std::min(63.0f, std::ceil(-lo[j] / dmin))) : 0;
    off[j] = dmin * m[j];
    step[j] = std::max(0.0f, (hi[j] + off[j]) / nmax);
    max_step = std::max(max_step, step[j]);
  }
  const uint16_t d16 = Fp16RoundUp(max_step / 63);
  const float d = Fp16ToFp32(d16);
  for (int j = 0; j < kSubBlocks; ++j) {
    sc[j] = d > 0 ? static_cast<uint8_t>(std::min(63.0f, std::ceil(step[j] / d))) : 0;
    const float scale = d * sc[j];
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    for (int l = 0; l < 32; ++l) {
      const float q = std::nearbyint((x[32 * j + l] + off[j]) * inv);
      codes[32 * j + l] = static_cast<uint8_t>(std::clamp(q, 0.0f, static_cast<float>(nmax)));
    }
  }
  *d_out = d16;
  *dmin_out = dmin16;
  EncodeQ4KScales(sc, m, scales);
}

// 4-bit codes in the Q4_K / Q5_K order (see BlockQ4_K).
void PackNibblesK(const uint8_t codes[kQK_K], uint8_t qs[kQK_K / 2]) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      qs[32 * c + l] =
          static_cast<uint8_t>((codes[64 * c + l] & 0xF) | ((codes[64 * c + 32 + l] & 0xF) << 4));
    }
  }
}

void DequantizeAffineK(float d, float dmin, const uint8_t scales[12], const uint8_t* qs,
                       const uint8_t* qh, float* out) {
  uint8_t sc[kSubBlocks], m[kSubBlocks];
  DecodeQ4KScales(scales, sc, m);
  for (int j = 0; j < kSubBlocks; ++j) {
    const float dj = d * sc[j], mj = dmin * m[j];
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      int code = (q[l] >> shift) & 0xF;
      if (qh != nullptr) code |= ((qh[l] >> j) & 1) << 4;
      out[32 * j + l] = dj * code - mj;
    }
  }
}

// Q6_K: 16 groups of 16 with a signed 8-bit scale each, codes -32..31. Each
// group's step is its largest magnitude / 31; d (rounded up to fp16) makes
// the largest step fit 127, each scale is rounded up, codes to nearest.
void QuantizeQ6K(const float* x, BlockQ6_K* b) {
  float step[kGroups], max_step = 0;
  for (int g = 0; g < kGroups; ++g) {
    float amax = 0;
    for (int l = 0; l < 16; ++l) amax = std::max(amax, std::fabs(x[16 * g + l]));
    step[g] = amax / 31;
    max_step = std::max(max_step, step[g]);
  }
  b->d = Fp16RoundUp(max_step / 127);
  const float d = Fp16ToFp32(b->d);
  uint8_t codes[kQK_K];  // code + 32, 0..63
  for (int g = 0; g < kGroups; ++g) {
    const int sc = d > 0 ? static_cast<int>(std::min(127.0f, std::ceil(step[g] / d))) : 0;
    b->scales[g] = static_cast<int8_t>(sc);
    const float inv = sc > 0 ? 1.0f / (d * sc) : 0.0f;
    for (int l = 0; l < 16; ++l) {
      const float q = std::clamp(std::nearbyint(x[16 * g + l] * inv), -32.0f, 31.0f);
      codes[16 * g + l] = static_cast<uint8_t>(static_cast<int>(q) + 32);
    }
  }
  // Each half of 128: ql[l] holds elements l (low) and l+64 (high), ql[l+32]
  // elements l+32 and l+96; qh[l] their top 2 bits at shifts 0, 2, 4, 6.
  for (int h = 0; h < 2; ++h) {
    const uint8_t* c = codes + 128 * h;
    uint8_t* ql = b->ql + 64 * h;
    uint8_t* qh = b->qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      ql[l] = static_cast<uint8_t>((c[l] & 0xF) | ((c[l + 64] & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((c[l + 32] & 0xF) | ((c[l + 96] & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((c[l] >> 4) | ((c[l + 32] >> 4) << 2) | ((c[l + 64] >> 4) << 4) |
                                   ((c[l + 96] >> 4) << 6));
    }
  }
}

void DequantizeQ6K(const BlockQ6_K& b, float* out) {
  const float d = Fp16ToFp32(b.d);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    const int8_t* sc = b.scales + 8 * h;
    float* y = out + 128 * h;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      y[l] = d * sc[is] * (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
      y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      y[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
  }
}

// Exactly ggml's quantize_row_q8_K_ref: the scale comes from the signed
// value of largest magnitude (iscale = -127 / max, d = 1 / iscale), codes
// round to nearest even and clamp at 127. An all-zero block stores zeros
// (ggml leaves its bsums unset there).
void QuantizeQ8K(const float* x, BlockQ8_K* b) {
  float amax = 0, max = 0;
  for (int j = 0; j < kQK_K; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  if (amax == 0) {
    std::memset(b, 0, sizeof(*b));
    return;
  }
  const float iscale = -127.0f / max;
  for (int j = 0; j < kQK_K; ++j) {
    b->qs[j] = static_cast<int8_t>(std::min(127, static_cast<int>(std::nearbyint(iscale * x[j]))));
  }
  for (int g = 0; g < kGroups; ++g) {
    int sum = 0;
    for (int l = 0; l < 16; ++l) sum += b->qs[16 * g + l];
    b->bsums[g] = static_cast<int16_t>(sum);
  }
  b->d = 1 / iscale;
}

}  // namespace

void DecodeQ4KScales(const uint8_t s[12], uint8_t sc[8], uint8_t m[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
    m[j + 4] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
  }
}

void DequantizeRowK(GgmlType t, const void* src, float* out, int64_t n) {
  const int64_t nb = n / kQK_K;
  for (int64_t i = 0; i < nb; ++i, out += kQK_K) {
    switch (t) {
      case GgmlType::kQ4_K: {
        const BlockQ4_K& b = static_cast<const BlockQ4_K*>(src)[i];
        DequantizeAffineK(Fp16ToFp32(b.d), Fp16ToFp32(b.dmin), b.scales, b.qs, nullptr, out);
        break;
      }
      case GgmlType::kQ5_K: {
        const BlockQ5_K& b = static_cast<const BlockQ5_K*>(src)[i];
        DequantizeAffineK(Fp16ToFp32(b.d), Fp16ToFp32(b.dmin), b.scales, b.qs, b.qh, out);
        break;
      }
      case GgmlType::kQ6_K:
        DequantizeQ6K(static_cast<const BlockQ6_K*>(src)[i], out);
        break;
      case GgmlType::kQ8_K: {
        const BlockQ8_K& b = static_cast<const BlockQ8_K*>(src)[i];
        for (int j = 0; j < kQK_K; ++j) out[j] = b.d * b.qs[j];
        break;
      }
      default:
        return;
    }
  }
}

void QuantizeRowK(GgmlType t, const float* src, void* dst, int64_t n) {
  const int64_t nb = n / kQK_K;
  uint8_t codes[kQK_K];
  for (int64_t i = 0; i < nb; ++i, src += kQK_K) {
    switch (t) {
      case GgmlType::kQ4_K: {
        BlockQ4_K& b = static_cast<BlockQ4_K*>(dst)[i];
        QuantizeAffineK(src, 15, &b.d, &b.dmin, b.scales, codes);
        PackNibblesK(codes, b.qs);
        break;
      }
      case GgmlType::kQ5_K: {
        BlockQ5_K& b = static_cast<BlockQ5_K*>(dst)[i];
        QuantizeAffineK(src, 31, &b.d, &b.dmin, b.scales, codes);
        PackNibblesK(codes, b.qs);
        std::memset(b.qh, 0, sizeof(b.qh));
        for (int j = 0; j < kQK_K; ++j) {
          b.qh[j % 32] = static_cast<uint8_t>(b.qh[j % 32] | ((codes[j] >> 4) << (j / 32)));
        }
        break;
      }
      case GgmlType::kQ6_K:
        QuantizeQ6K(src, &static_cast<BlockQ6_K*>(dst)[i]);
        break;
      case GgmlType::kQ8_K:
        QuantizeQ8K(src, &static_cast<BlockQ8_K*>(dst)[i]);
        break;
      default:
        return;
    }
  }
}

}  // namespace psa
