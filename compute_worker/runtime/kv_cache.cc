#include "compute_worker/runtime/kv_cache.h"

#include <algorithm>
#include <cstring>

namespace psa {

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim)
    : n_layer_(n_layer), n_head_kv_(n_head_kv), head_dim_(head_dim), k_(n_layer), v_(n_layer) {}

void KvCache::Reserve(int n) {
  if (n <= capacity_) return;
  const int new_cap = std::max(n, std::max(64, capacity_ * 2));
  const size_t row = head_dim_;
  for (int l = 0; l < n_layer_; ++l) {
    for (auto* buf : {&k_[l], &v_[l]}) {
      std::vector<uint16_t> grown(static_cast<size_t>(n_head_kv_) * new_cap * row);
      for (int h = 0; h < n_head_kv_; ++h) {
        std::memcpy(grown.data() + h * new_cap * row, buf->data() + h * capacity_ * row,
                    static_cast<size_t>(length_) * row * sizeof(uint16_t));
      }
      buf->swap(grown);
    }
  }
  capacity_ = new_cap;
}

size_t KvCache::bytes() const {
  return static_cast<size_t>(2) * n_layer_ * n_head_kv_ * capacity_ * head_dim_ * sizeof(uint16_t);
}

}  // namespace psa
