// The K-quant super-block types (Q4_K, Q5_K, Q6_K) and their activation
// partner Q8_K: the float conversions behind DequantizeRow / QuantizeRow in
// ggml_types.h, which is the interface to use. Kept apart so that file stays
// about the 32-element types. Stateless; safe from any thread.
#ifndef PSA_COMPUTE_WORKER_MODEL_GGML_KQUANTS_H_
#define PSA_COMPUTE_WORKER_MODEL_GGML_KQUANTS_H_

#include <cstdint>

#include "compute_worker/model/ggml_types.h"

namespace psa {

// t is kQ4_K, kQ5_K, kQ6_K or kQ8_K; n a multiple of kQK_K.
void DequantizeRowK(GgmlType t, const void* src, float* out, int64_t n);
void QuantizeRowK(GgmlType t, const float* src, void* dst, int64_t n);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_GGML_KQUANTS_H_
