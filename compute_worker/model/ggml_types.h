// ggml tensor element types: ids as stored in GGUF, block layouts, and
// conversion to and from float. The quantised dot-product kernels that read
// these layouts live in kernels/matmul.h and kernels/kquant_dot.h.
// Free functions on caller-owned buffers: safe to call from any thread.
#ifndef PSA_COMPUTE_WORKER_MODEL_GGML_TYPES_H_
#define PSA_COMPUTE_WORKER_MODEL_GGML_TYPES_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace psa {

// Values are the ggml type ids used on disk.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,  // activations only (never a weight type here)
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,  // activations only: the K-quants' dot-product partner
  kBF16 = 30,
};

constexpr int kQK = 32;     // elements per block of the Q4/Q5/Q8 _0 and _1 types
constexpr int kQK_K = 256;  // elements per super-block of the K-quants

#pragma pack(push, 1)
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[kQK / 2]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
// Q8_1: s = d * sum(qs), used to fold Q4_1's minimum into the dot product.
struct BlockQ8_1 { uint16_t d; uint16_t s; int8_t qs[kQK]; };
// Q5_0 / Q5_1: bit j of qh (read as a little-endian uint32) is the fifth bit
// of element j; qs holds elements 0..15 in low nibbles, 16..31 in high ones.
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
struct BlockQ5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
// Q4_K: 8 sub-blocks of 32, value = d * sc[j] * q - dmin * m[j] with 6-bit
// sc and m packed into `scales` (DecodeQ4KScales). qs: 64-element chunk c is
// qs[32c..32c+31], low nibbles elements 64c..64c+31, high ones 64c+32..64c+63.
struct BlockQ4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[kQK_K / 2]; };
// Q5_K: Q4_K plus a fifth bit: bit j of qh[l] belongs to element 32j + l.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[kQK_K / 8];
  uint8_t qs[kQK_K / 2];
};
// Q6_K: 16 sub-blocks of 16, value = d * scales[j] * (q - 32), q 6 bits
// split into 4 low bits (ql) and 2 high bits (qh); layout in DequantizeRow.
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];
  uint8_t qh[kQK_K / 4];
  int8_t scales[kQK_K / 16];
  uint16_t d;
};
// Q8_K: float scale, bsums[g] = sum of qs[16g..16g+15] (folds the K-quants'
// minimums and Q6_K's offset into the dot product).
struct BlockQ8_K { float d; int8_t qs[kQK_K]; int16_t bsums[kQK_K / 16]; };
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

// The 6-bit scales and minimums of a Q4_K / Q5_K super-block: sub-block j < 4
// has sc = s[j] & 63, m = s[j + 4] & 63; j >= 4 keeps its low 4 bits in
// s[j + 4] (sc low nibble, m high nibble) and its top 2 bits in the top bits
// of s[j - 4] (sc) and s[j] (m).
void DecodeQ4KScales(const uint8_t scales[12], uint8_t sc[8], uint8_t m[8]);

// True for the types this runtime can load as tensors (weights: never the
// activation-only Q8_1 / Q8_K).
bool IsSupportedType(uint32_t raw_type);
// "F32, F16, ...": the names of the supported types, for error messages.
std::string_view SupportedTypeNames();
std::string_view TypeName(GgmlType t);
// Elements per block (1 for float types, 256 for K-quants) and bytes per block.
int BlockElements(GgmlType t);
size_t BlockBytes(GgmlType t);
// Bytes of a row of n elements; n must be a multiple of BlockElements(t).
size_t RowBytes(GgmlType t, int64_t n);

// IEEE half <-> single. Inline hardware conversions where the CPU has them
// (they sit in every quantised dot product); portable versions otherwise.
float Fp16ToFp32Portable(uint16_t h);
uint16_t Fp32ToFp16Portable(float f);  // round to nearest even
#if defined(__F16C__)
inline float Fp16ToFp32(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t Fp32ToFp16(float f) { return _cvtss_sh(f, 0 /* nearest even */); }
#else
inline float Fp16ToFp32(uint16_t h) { return Fp16ToFp32Portable(h); }
inline uint16_t Fp32ToFp16(float f) { return Fp32ToFp16Portable(f); }
#endif
inline float Bf16ToFp32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t Fp32ToBf16(float f);  // round to nearest even

// Decodes n elements (a multiple of the block size) of type t into out.
void DequantizeRow(GgmlType t, const void* src, float* out, int64_t n);
// Encodes n floats as type t. F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1
// and Q8_K round as ggml's reference quantisers do. Q4_K, Q5_K and Q6_K use
// a simple quantiser (scales rounded up so no value clips, codes rounded to
// nearest) rather than ggml's rounding search: correct, a little less
// accurate, and meant for tests and tools, not for making model files.
// Valid for every weight type and for kQ8_1 and kQ8_K.
void QuantizeRow(GgmlType t, const float* src, void* dst, int64_t n);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_GGML_TYPES_H_
