#include "compute_worker/runtime/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "compute_worker/model/ggml_types.h"

namespace psa {

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int block_size)
    : n_layer_(n_layer),
      n_head_kv_(n_head_kv),
      head_dim_(head_dim),
      block_size_(block_size > 0 ? block_size : kDefaultBlockSize),
      k_(n_layer),
      v_(n_layer),
      kmax_(n_layer),
      kmin_(n_layer) {}

void KvCache::Reserve(int n) {
  if (n <= capacity_) return;
  int new_cap = std::max(n, std::max(64, capacity_ * 2));
  new_cap = (new_cap + block_size_ - 1) / block_size_ * block_size_;
  const size_t row = head_dim_;
  const size_t old_blocks = max_blocks(), new_blocks = new_cap / block_size_;
  for (int l = 0; l < n_layer_; ++l) {
    for (auto* meta : {&kmax_[l], &kmin_[l]}) {
      std::vector<uint16_t> grown(static_cast<size_t>(n_head_kv_) * new_blocks * row);
      for (int h = 0; h < n_head_kv_; ++h) {
        std::memcpy(grown.data() + h * new_blocks * row, meta->data() + h * old_blocks * row,
                    static_cast<size_t>(full_blocks()) * row * sizeof(uint16_t));
      }
      meta->swap(grown);
    }
  }
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

void KvCache::Commit(int n) {
  const int first = full_blocks(), last = n / block_size_;
  length_ = n;
  std::vector<float> key(head_dim_), mx(head_dim_), mn(head_dim_);
  for (int l = 0; l < n_layer_; ++l) {
    for (int h = 0; h < n_head_kv_; ++h) {
      for (int b = first; b < last; ++b) {
        std::fill(mx.begin(), mx.end(), -INFINITY);
        std::fill(mn.begin(), mn.end(), INFINITY);
        for (int t = b * block_size_; t < (b + 1) * block_size_; ++t) {
          DequantizeRow(GgmlType::kF16, Keys(l, h) + static_cast<size_t>(t) * head_dim_,
                        key.data(), head_dim_);
          for (int d = 0; d < head_dim_; ++d) {
            mx[d] = std::max(mx[d], key[d]);
            mn[d] = std::min(mn[d], key[d]);
          }
        }
        const size_t at = (static_cast<size_t>(h) * max_blocks() + b) * head_dim_;
        QuantizeRow(GgmlType::kF16, mx.data(), kmax_[l].data() + at, head_dim_);  // exact
        QuantizeRow(GgmlType::kF16, mn.data(), kmin_[l].data() + at, head_dim_);
      }
    }
  }
}

size_t KvCache::bytes() const {
  const size_t kv = static_cast<size_t>(2) * n_layer_ * n_head_kv_ * capacity_ * head_dim_;
  const size_t meta = static_cast<size_t>(2) * n_layer_ * n_head_kv_ * max_blocks() * head_dim_;
  return (kv + meta) * sizeof(uint16_t);
}

}  // namespace psa
