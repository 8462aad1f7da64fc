// Per-sequence KV cache: for every layer and KV head, the keys and the values
// of all positions so far, fp16, contiguous by position (so a head's keys are
// one [length x head_dim] matrix). Positions are grouped into blocks of
// block_size tokens; every full block carries metadata per KV head — the
// per-dimension max and min of its keys — from which the sparse attention
// policies estimate a block's criticality without reading its keys.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
#define PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace psa {

class KvCache {
 public:
  static constexpr int kDefaultBlockSize = 16;
  KvCache(int n_layer, int n_head_kv, int head_dim, int block_size = kDefaultBlockSize);

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_head_kv_; }
  int head_dim() const { return head_dim_; }
  // Positions committed (visible to attention).
  int length() const { return length_; }
  int capacity() const { return capacity_; }
  int block_size() const { return block_size_; }
  // Blocks whose block_size positions are all committed (metadata valid).
  int full_blocks() const { return length_ / block_size_; }

  // Makes room for `n` positions in total (keeps contents).
  void Reserve(int n);
  // Writable slot for position pos (< capacity) of (layer, head).
  uint16_t* KeySlot(int layer, int head, int pos) {
    return k_[layer].data() + (static_cast<size_t>(head) * capacity_ + pos) * head_dim_;
  }
  uint16_t* ValueSlot(int layer, int head, int pos) {
    return v_[layer].data() + (static_cast<size_t>(head) * capacity_ + pos) * head_dim_;
  }
  // Keys / values of (layer, head): row p is position p.
  const uint16_t* Keys(int layer, int head) const {
    return k_[layer].data() + static_cast<size_t>(head) * capacity_ * head_dim_;
  }
  const uint16_t* Values(int layer, int head) const {
    return v_[layer].data() + static_cast<size_t>(head) * capacity_ * head_dim_;
  }
  // Per-dimension max / min of the keys of full block b of (layer, head),
  // fp16: the keys are fp16, so their extremes are exact and the metadata
  // costs 1/16 of the block's K+V bytes.
  const uint16_t* KeyMax(int layer, int head, int b) const {
    return kmax_[layer].data() + (static_cast<size_t>(head) * max_blocks() + b) * head_dim_;
  }
  const uint16_t* KeyMin(int layer, int head, int b) const {
    return kmin_[layer].data() + (static_cast<size_t>(head) * max_blocks() + b) * head_dim_;
  }
  // Makes positions [0, n) visible (n <= capacity) and computes the
  // metadata of every block that became full.
  void Commit(int n);
  // Drops positions >= n (rewinding a sequence).
  void Truncate(int n) {
    if (n < length_) length_ = n;
  }
  size_t bytes() const;

 private:
  int max_blocks() const { return capacity_ / block_size_; }

  int n_layer_, n_head_kv_, head_dim_, block_size_;
  int length_ = 0;
  int capacity_ = 0;  // a multiple of block_size_
  std::vector<std::vector<uint16_t>> k_, v_;     // per layer: [head][capacity][dim]
  std::vector<std::vector<uint16_t>> kmax_, kmin_;  // per layer: [head][max_blocks][dim]
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
