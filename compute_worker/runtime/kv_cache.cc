#include "compute_worker/runtime/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>

#include "compute_worker/model/ggml_types.h"

namespace psa {

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int block_size)
    : n_layer_(n_layer),
      n_head_kv_(n_head_kv),
      head_dim_(head_dim),
      block_size_(block_size > 0 ? block_size : kDefaultBlockSize),
      blocks_(n_layer),
      kmax_(n_layer),
      kmin_(n_layer) {}

KvCache::KvCache(const KvCache& other) { *this = other; }

KvCache& KvCache::operator=(const KvCache& other) {
  if (this == &other) return *this;
  n_layer_ = other.n_layer_;
  n_head_kv_ = other.n_head_kv_;
  head_dim_ = other.head_dim_;
  block_size_ = other.block_size_;
  length_ = other.length_;
  capacity_ = other.capacity_;
  kmax_ = other.kmax_;
  kmin_ = other.kmin_;
  blocks_.clear();
  blocks_.resize(n_layer_);
  slabs_.clear();
  slab_next_ = nullptr;
  slab_left_ = 0;
  const size_t n = block_elements();
  for (int l = 0; l < n_layer_; ++l) {
    AllocateBlocks(l, other.blocks_[l].size());
    for (size_t b = 0; b < blocks_[l].size(); ++b) {
      std::memcpy(blocks_[l][b], other.blocks_[l][b], n * sizeof(uint16_t));
    }
  }
  return *this;
}

void KvCache::Reserve(int n) {
  if (n <= capacity_) return;
  int new_cap = std::max(n, std::max(64, capacity_ * 2));
  new_cap = (new_cap + block_size_ - 1) / block_size_ * block_size_;
  const size_t row = head_dim_;
  const size_t old_blocks = max_blocks(), new_blocks = new_cap / block_size_;
  for (int l = 0; l < n_layer_; ++l) {
    for (auto* meta : {&kmax_[l], &kmin_[l]}) {
      std::vector<uint16_t> grown(static_cast<size_t>(n_head_kv_) * new_blocks * row);
      for (int h = 0; h < n_head_kv_ && full_blocks() > 0; ++h) {
        std::memcpy(grown.data() + h * new_blocks * row, meta->data() + h * old_blocks * row,
                    static_cast<size_t>(full_blocks()) * row * sizeof(uint16_t));
      }
      meta->swap(grown);
    }
    // New blocks only: existing ones never move (pointers into them stay valid).
    AllocateBlocks(l, new_blocks - old_blocks);
  }
  capacity_ = new_cap;
}

void KvCache::FreeSlab::operator()(uint16_t* p) const { std::free(p); }

void KvCache::AllocateBlocks(int layer, size_t count) {
  constexpr size_t kSlabBytes = 2 << 20;
  const size_t block_bytes = block_elements() * sizeof(uint16_t);
  for (size_t i = 0; i < count; ++i) {
    if (slab_left_ == 0) {
      // Slabs of up to 2 MiB: few allocations, and blocks of a layer mostly
      // adjacent. Not zeroed: attention reads only committed rows, and
      // pages are then touched as rows are written rather than all at once
      // (a doubling at 8K tokens would otherwise stall one step for 190 MB).
      const size_t want = std::max<size_t>(count - i, 1) * block_bytes;
      const size_t bytes = std::min(want, kSlabBytes);
      void* p = std::malloc(bytes);
      if (p == nullptr) throw std::bad_alloc();
      slabs_.emplace_back(static_cast<uint16_t*>(p));
      slab_next_ = static_cast<uint16_t*>(p);
      slab_left_ = bytes / block_bytes;
    }
    blocks_[layer].push_back(slab_next_);
    slab_next_ += block_elements();
    --slab_left_;
  }
}

void KvCache::Commit(int n) {
  const int first = full_blocks(), last = n / block_size_;
  length_ = n;
  std::vector<float> key(head_dim_), mx(head_dim_), mn(head_dim_);
  for (int l = 0; l < n_layer_; ++l) {
    for (int h = 0; h < n_head_kv_; ++h) {
      const KvRows keys = Keys(l, h);
      for (int b = first; b < last; ++b) {
        std::fill(mx.begin(), mx.end(), -INFINITY);
        std::fill(mn.begin(), mn.end(), INFINITY);
        for (int t = b * block_size_; t < (b + 1) * block_size_; ++t) {
          DequantizeRow(GgmlType::kF16, keys.row(t), key.data(), head_dim_);
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
  const size_t kv = static_cast<size_t>(n_layer_) * max_blocks() * block_elements();
  const size_t meta = static_cast<size_t>(2) * n_layer_ * n_head_kv_ * max_blocks() * head_dim_;
  return (kv + meta) * sizeof(uint16_t);
}

}  // namespace psa
