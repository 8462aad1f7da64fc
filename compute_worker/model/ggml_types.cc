#include "compute_worker/model/ggml_types.h"

#include <algorithm>
#include <cmath>

#include "compute_worker/model/ggml_kquants.h"

namespace psa {
namespace {

// The fifth bits of a Q5 block's 32 codes, as stored in qh.
uint32_t LoadQh(const uint8_t qh[4]) {
  uint32_t v;
  std::memcpy(&v, qh, 4);  // little-endian, as GGUF is
  return v;
}

void StoreQ5(const int codes[kQK], uint8_t qs[kQK / 2], uint8_t qh[4]) {
  uint32_t bits = 0;
  for (int j = 0; j < kQK / 2; ++j) {
    qs[j] = static_cast<uint8_t>((codes[j] & 0xF) | ((codes[j + kQK / 2] & 0xF) << 4));
  }
  for (int j = 0; j < kQK; ++j) bits |= static_cast<uint32_t>((codes[j] >> 4) & 1) << j;
  std::memcpy(qh, &bits, 4);
}

// The 5-bit code of element j (0..31) of a Q5 block.
inline int Q5Code(const uint8_t* qs, uint32_t qh, int j) {
  const int nibble = j < kQK / 2 ? qs[j] & 0xF : qs[j - kQK / 2] >> 4;
  return nibble | static_cast<int>(((qh >> j) & 1) << 4);
}

}  // namespace

bool IsSupportedType(uint32_t raw) {
  switch (static_cast<GgmlType>(raw)) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
      return true;
    default:
      return false;
  }
}

std::string_view SupportedTypeNames() {
  return "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";
}

std::string_view TypeName(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return "F32";
    case GgmlType::kF16: return "F16";
    case GgmlType::kBF16: return "BF16";
    case GgmlType::kQ4_0: return "Q4_0";
    case GgmlType::kQ4_1: return "Q4_1";
    case GgmlType::kQ8_0: return "Q8_0";
    case GgmlType::kQ8_1: return "Q8_1";
    case GgmlType::kQ5_0: return "Q5_0";
    case GgmlType::kQ5_1: return "Q5_1";
    case GgmlType::kQ4_K: return "Q4_K";
    case GgmlType::kQ5_K: return "Q5_K";
    case GgmlType::kQ6_K: return "Q6_K";
    case GgmlType::kQ8_K: return "Q8_K";
  }
  return "unknown";
}

int BlockElements(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return 1;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
    case GgmlType::kQ8_K:
      return kQK_K;
    default:
      return kQK;
  }
}

size_t BlockBytes(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16: return 2;
    case GgmlType::kBF16: return 2;
    case GgmlType::kQ4_0: return sizeof(BlockQ4_0);
    case GgmlType::kQ4_1: return sizeof(BlockQ4_1);
    case GgmlType::kQ8_0: return sizeof(BlockQ8_0);
    case GgmlType::kQ8_1: return sizeof(BlockQ8_1);
    case GgmlType::kQ5_0: return sizeof(BlockQ5_0);
    case GgmlType::kQ5_1: return sizeof(BlockQ5_1);
    case GgmlType::kQ4_K: return sizeof(BlockQ4_K);
    case GgmlType::kQ5_K: return sizeof(BlockQ5_K);
    case GgmlType::kQ6_K: return sizeof(BlockQ6_K);
    case GgmlType::kQ8_K: return sizeof(BlockQ8_K);
  }
  return 0;
}

size_t RowBytes(GgmlType t, int64_t n) {
  return static_cast<size_t>(n / BlockElements(t)) * BlockBytes(t);
}

float Fp16ToFp32Portable(uint16_t h) {
  // IEEE half -> single, handling subnormals, inf and NaN.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t Fp32ToFp16Portable(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t abs = x & 0x7fffffff;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);  // overflow
  if (abs < 0x38800000u) {  // subnormal or zero in half
    // Scale so the half subnormal lsb becomes 1, round to nearest even.
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // 2^24
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | m);
  }
  // Normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even.
  uint32_t h = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rest = abs & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

uint16_t Fp32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);
  return static_cast<uint16_t>((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

void DequantizeRow(GgmlType t, const void* src, float* out, int64_t n) {
  switch (t) {
    case GgmlType::kF32:
      std::memcpy(out, src, n * 4);
      return;
    case GgmlType::kF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = Fp16ToFp32(s[i]);
      return;
    }
    case GgmlType::kBF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFp32(s[i]);
      return;
    }
    case GgmlType::kQ4_0: {
      auto* b = static_cast<const BlockQ4_0*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        for (int j = 0; j < kQK / 2; ++j) {
          out[j] = ((b[i].qs[j] & 0xf) - 8) * d;
          out[j + kQK / 2] = ((b[i].qs[j] >> 4) - 8) * d;
        }
      }
      return;
    }
    case GgmlType::kQ4_1: {
      auto* b = static_cast<const BlockQ4_1*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        const float m = Fp16ToFp32(b[i].m);
        for (int j = 0; j < kQK / 2; ++j) {
          out[j] = (b[i].qs[j] & 0xf) * d + m;
          out[j + kQK / 2] = (b[i].qs[j] >> 4) * d + m;
        }
      }
      return;
    }
    case GgmlType::kQ8_0: {
      auto* b = static_cast<const BlockQ8_0*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        for (int j = 0; j < kQK; ++j) out[j] = b[i].qs[j] * d;
      }
      return;
    }
    case GgmlType::kQ8_1: {
      auto* b = static_cast<const BlockQ8_1*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        for (int j = 0; j < kQK; ++j) out[j] = b[i].qs[j] * d;
      }
      return;
    }
    case GgmlType::kQ5_0: {
      auto* b = static_cast<const BlockQ5_0*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        const uint32_t qh = LoadQh(b[i].qh);
        for (int j = 0; j < kQK; ++j) out[j] = (Q5Code(b[i].qs, qh, j) - 16) * d;
      }
      return;
    }
    case GgmlType::kQ5_1: {
      auto* b = static_cast<const BlockQ5_1*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, out += kQK) {
        const float d = Fp16ToFp32(b[i].d);
        const float m = Fp16ToFp32(b[i].m);
        const uint32_t qh = LoadQh(b[i].qh);
        for (int j = 0; j < kQK; ++j) out[j] = Q5Code(b[i].qs, qh, j) * d + m;
      }
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
    case GgmlType::kQ8_K:
      DequantizeRowK(t, src, out, n);
      return;
  }
}

void QuantizeRow(GgmlType t, const float* src, void* dst, int64_t n) {
  switch (t) {
    case GgmlType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case GgmlType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = Fp32ToFp16(src[i]);
      return;
    }
    case GgmlType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = Fp32ToBf16(src[i]);
      return;
    }
    case GgmlType::kQ4_0: {
      auto* b = static_cast<BlockQ4_0*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float amax = 0, max = 0;
        for (int j = 0; j < kQK; ++j) {
          if (std::fabs(src[j]) > amax) { amax = std::fabs(src[j]); max = src[j]; }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        b[i].d = Fp32ToFp16(d);
        for (int j = 0; j < kQK / 2; ++j) {
          const int x0 = std::min(15, static_cast<int>(src[j] * id + 8.5f));
          const int x1 = std::min(15, static_cast<int>(src[j + kQK / 2] * id + 8.5f));
          b[i].qs[j] = static_cast<uint8_t>(x0 | (x1 << 4));
        }
      }
      return;
    }
    case GgmlType::kQ4_1: {
      auto* b = static_cast<BlockQ4_1*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float min = src[0], max = src[0];
        for (int j = 1; j < kQK; ++j) {
          min = std::min(min, src[j]);
          max = std::max(max, src[j]);
        }
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        b[i].d = Fp32ToFp16(d);
        b[i].m = Fp32ToFp16(min);
        for (int j = 0; j < kQK / 2; ++j) {
          const int x0 = std::min(15, static_cast<int>((src[j] - min) * id + 0.5f));
          const int x1 = std::min(15, static_cast<int>((src[j + kQK / 2] - min) * id + 0.5f));
          b[i].qs[j] = static_cast<uint8_t>(x0 | (x1 << 4));
        }
      }
      return;
    }
    case GgmlType::kQ8_0: {
      auto* b = static_cast<BlockQ8_0*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(src[j]));
        const float d = amax / 127;
        const float id = amax != 0 ? 127.0f / amax : 0.0f;  // as ggml's SIMD path
        b[i].d = Fp32ToFp16(d);
        for (int j = 0; j < kQK; ++j) b[i].qs[j] = static_cast<int8_t>(std::nearbyint(src[j] * id));
      }
      return;
    }
    case GgmlType::kQ8_1: {
      auto* b = static_cast<BlockQ8_1*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float amax = 0;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(src[j]));
        const float d = amax / 127;
        const float id = amax != 0 ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < kQK; ++j) {
          b[i].qs[j] = static_cast<int8_t>(std::nearbyint(src[j] * id));
          sum += b[i].qs[j];
        }
        b[i].d = Fp32ToFp16(d);
        b[i].s = Fp32ToFp16(sum * d);
      }
      return;
    }
    case GgmlType::kQ5_0: {  // as Q4_0 with 32 levels: d = max / -16
      auto* b = static_cast<BlockQ5_0*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float amax = 0, max = 0;
        for (int j = 0; j < kQK; ++j) {
          if (std::fabs(src[j]) > amax) { amax = std::fabs(src[j]); max = src[j]; }
        }
        const float d = max / -16;
        const float id = d ? 1.0f / d : 0.0f;
        int codes[kQK];
        for (int j = 0; j < kQK; ++j) {
          codes[j] = std::min(31, static_cast<int>(static_cast<int8_t>(src[j] * id + 16.5f)));
        }
        b[i].d = Fp32ToFp16(d);
        StoreQ5(codes, b[i].qs, b[i].qh);
      }
      return;
    }
    case GgmlType::kQ5_1: {  // as Q4_1 with 32 levels: d = (max - min) / 31
      auto* b = static_cast<BlockQ5_1*>(dst);
      for (int64_t i = 0; i < n / kQK; ++i, src += kQK) {
        float min = src[0], max = src[0];
        for (int j = 1; j < kQK; ++j) {
          min = std::min(min, src[j]);
          max = std::max(max, src[j]);
        }
        const float d = (max - min) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        int codes[kQK];
        for (int j = 0; j < kQK; ++j) {
          codes[j] = std::min(31, static_cast<int>((src[j] - min) * id + 0.5f));
        }
        b[i].d = Fp32ToFp16(d);
        b[i].m = Fp32ToFp16(min);
        StoreQ5(codes, b[i].qs, b[i].qh);
      }
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
    case GgmlType::kQ8_K:
      QuantizeRowK(t, src, dst, n);
      return;
  }
}

}  // namespace psa
