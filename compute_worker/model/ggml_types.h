// ggml tensor element types: ids as stored in GGUF, block layouts, and
// conversion to and from float. The quantised dot-product kernels that read
// these layouts live in runtime/quant_kernels.h.
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
  kQ8_0 = 8,
  kQ8_1 = 9,  // activations only (never a weight type here)
  kBF16 = 30,
};

constexpr int kQK = 32;  // elements per block for every quantised type here

#pragma pack(push, 1)
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[kQK / 2]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
// Q8_1: s = d * sum(qs), used to fold Q4_1's minimum into the dot product.
struct BlockQ8_1 { uint16_t d; uint16_t s; int8_t qs[kQK]; };
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);

// True for the types this runtime can load as tensors.
bool IsSupportedType(uint32_t raw_type);
std::string_view TypeName(GgmlType t);
// Elements per block (1 for float types) and bytes per block.
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
// Encodes n floats as type t (reference quantisers, same rounding as ggml).
// Valid for every weight type and for kQ8_1.
void QuantizeRow(GgmlType t, const float* src, void* dst, int64_t n);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_GGML_TYPES_H_
