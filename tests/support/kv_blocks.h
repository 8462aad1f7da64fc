// Deterministic KV blocks for KV service tests and benchmarks.
#ifndef PSA_TESTS_SUPPORT_KV_BLOCKS_H_
#define PSA_TESTS_SUPPORT_KV_BLOCKS_H_

#include <cstdint>
#include <string>

#include "proto/psa/v1/kv_service.pb.h"

namespace psa::testing {

// A small layout: 2 layers, 2 KV heads, head dim 8, blocks of 4, fp16
// (data 256 bytes, metadata 96 bytes per block).
inline psa::v1::KvLayout SmallLayout(const std::string& model_id = "test-model") {
  psa::v1::KvLayout l;
  l.set_model_id(model_id);
  l.set_num_layers(2);
  l.set_num_kv_heads(2);
  l.set_head_dim(8);
  l.set_block_size(4);
  l.set_dtype(psa::v1::KV_DTYPE_F16);
  return l;
}

// The default model's shape (3 KV heads, head dim 64, blocks of 16 fp16
// tokens: 12 KiB of K+V per block) with `layers` layers (the model has 30).
inline psa::v1::KvLayout ModelShapedLayout(const std::string& model_id, int layers = 30) {
  psa::v1::KvLayout l = SmallLayout(model_id);
  l.set_num_layers(layers);
  l.set_num_kv_heads(3);
  l.set_head_dim(64);
  l.set_block_size(16);
  return l;
}

// Pseudo-random bytes determined by (seed, n).
inline std::string PatternBytes(uint64_t seed, size_t n) {
  std::string s(n, '\0');
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s[i] = static_cast<char>(x);
  }
  return s;
}

// Block (layer, index) of a sequence whose content is set by `seed`.
inline psa::v1::KvBlock MakeBlock(const psa::v1::KvLayout& l, uint32_t layer, uint32_t index,
                                  uint64_t seed) {
  const size_t elem = l.dtype() == psa::v1::KV_DTYPE_F32 ? 4 : 2;
  psa::v1::KvBlock b;
  b.set_layer(layer);
  b.set_index(index);
  const uint64_t key = seed * 1000003 + layer * 4099 + index;
  b.set_data(PatternBytes(key, 2ull * l.num_kv_heads() * l.block_size() * l.head_dim() * elem));
  b.set_metadata(PatternBytes(~key, 3ull * l.num_kv_heads() * l.head_dim() * elem));
  return b;
}

}  // namespace psa::testing

#endif  // PSA_TESTS_SUPPORT_KV_BLOCKS_H_
