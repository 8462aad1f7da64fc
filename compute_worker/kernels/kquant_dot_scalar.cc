// Scalar Q5_0 / Q5_1 / K-quant dot products: integer sums per block, scaled
// once per block, as the SIMD kernels do. Declared in kquant_dot.h.
#include <cstring>

#include "compute_worker/kernels/kquant_dot.h"

namespace psa {
namespace {

// The 5-bit code of element j of a Q5 block (qh read as a little-endian u32).
inline int Q5Code(const uint8_t* qs, const uint8_t qh[4], int j) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const int nibble = j < kQK / 2 ? qs[j] & 0xF : qs[j - kQK / 2] >> 4;
  return nibble | static_cast<int>(((bits >> j) & 1) << 4);
}

float DotQ5_0(const uint8_t* w_row, const uint8_t* x_row, int nb) {
  const auto* w = reinterpret_cast<const BlockQ5_0*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_0*>(x_row);
  float sum = 0;
  for (int b = 0; b < nb; ++b) {
    int s = 0;
    for (int j = 0; j < kQK; ++j) s += (Q5Code(w[b].qs, w[b].qh, j) - 16) * x[b].qs[j];
    sum += Fp16ToFp32(w[b].d) * Fp16ToFp32(x[b].d) * s;
  }
  return sum;
}

float DotQ5_1(const uint8_t* w_row, const uint8_t* x_row, int nb) {
  const auto* w = reinterpret_cast<const BlockQ5_1*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_1*>(x_row);
  float sum = 0;
  for (int b = 0; b < nb; ++b) {
    int s = 0;
    for (int j = 0; j < kQK; ++j) s += Q5Code(w[b].qs, w[b].qh, j) * x[b].qs[j];
    sum += Fp16ToFp32(w[b].d) * Fp16ToFp32(x[b].d) * s + Fp16ToFp32(w[b].m) * Fp16ToFp32(x[b].s);
  }
  return sum;
}

// Q4_K (qh null) and Q5_K: sum_j sc_j * dot(q, x) scaled by d * dx, minus
// the minimums, which need only the activations' 16-element sums.
float DotAffineK(float d, float dmin, const uint8_t scales[12], const uint8_t* qs,
                 const uint8_t* qh, const BlockQ8_K& x) {
  uint8_t sc[8], m[8];
  DecodeQ4KScales(scales, sc, m);
  int isum = 0, imin = 0;
  for (int j = 0; j < 8; ++j) {
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    int s = 0;
    for (int l = 0; l < 32; ++l) {
      int code = (q[l] >> shift) & 0xF;
      if (qh != nullptr) code |= ((qh[l] >> j) & 1) << 4;
      s += code * x.qs[32 * j + l];
    }
    isum += sc[j] * s;
    imin += m[j] * (x.bsums[2 * j] + x.bsums[2 * j + 1]);
  }
  return d * x.d * isum - dmin * x.d * imin;
}

float DotQ4_K(const uint8_t* w_row, const uint8_t* x_row, int nb) {
  const auto* w = reinterpret_cast<const BlockQ4_K*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0;
  for (int b = 0; b < nb; ++b) {
    sum += DotAffineK(Fp16ToFp32(w[b].d), Fp16ToFp32(w[b].dmin), w[b].scales, w[b].qs, nullptr,
                      x[b]);
  }
  return sum;
}

float DotQ5_K(const uint8_t* w_row, const uint8_t* x_row, int nb) {
  const auto* w = reinterpret_cast<const BlockQ5_K*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0;
  for (int b = 0; b < nb; ++b) {
    sum += DotAffineK(Fp16ToFp32(w[b].d), Fp16ToFp32(w[b].dmin), w[b].scales, w[b].qs, w[b].qh,
                      x[b]);
  }
  return sum;
}

float DotQ6_K(const uint8_t* w_row, const uint8_t* x_row, int nb) {
  const auto* w = reinterpret_cast<const BlockQ6_K*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0;
  for (int b = 0; b < nb; ++b) {
    int isum = 0;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = w[b].ql + 64 * h;
      const uint8_t* qh = w[b].qh + 32 * h;
      const int8_t* sc = w[b].scales + 8 * h;
      const int8_t* q8 = x[b].qs + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        isum += sc[is] * (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * q8[l];
        isum += sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * q8[l + 32];
        isum += sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * q8[l + 64];
        isum += sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * q8[l + 96];
      }
    }
    sum += Fp16ToFp32(w[b].d) * x[b].d * isum;
  }
  return sum;
}

}  // namespace

float ScalarKQuantDot(GgmlType weight_type, const uint8_t* w_row, const uint8_t* x_row,
                      int64_t cols) {
  const int nb = static_cast<int>(cols / kQK), nb_k = static_cast<int>(cols / kQK_K);
  switch (weight_type) {
    case GgmlType::kQ5_0: return DotQ5_0(w_row, x_row, nb);
    case GgmlType::kQ5_1: return DotQ5_1(w_row, x_row, nb);
    case GgmlType::kQ4_K: return DotQ4_K(w_row, x_row, nb_k);
    case GgmlType::kQ5_K: return DotQ5_K(w_row, x_row, nb_k);
    case GgmlType::kQ6_K: return DotQ6_K(w_row, x_row, nb_k);
    default: return 0;
  }
}

}  // namespace psa
