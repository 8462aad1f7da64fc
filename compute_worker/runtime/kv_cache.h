// Dense per-sequence KV cache: for every layer and KV head, the keys and the
// values of all positions so far, fp16, contiguous by position (so a head's
// keys are one [length x head_dim] matrix). The PSA engine's paged cache
// builds on the same layout per block.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
#define PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace psa {

class KvCache {
 public:
  KvCache(int n_layer, int n_head_kv, int head_dim);

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_head_kv_; }
  int head_dim() const { return head_dim_; }
  // Positions committed (visible to attention).
  int length() const { return length_; }
  int capacity() const { return capacity_; }

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
  // Makes positions [0, n) visible; n <= capacity.
  void Commit(int n) { length_ = n; }
  // Drops positions >= n (rewinding a sequence).
  void Truncate(int n) {
    if (n < length_) length_ = n;
  }
  size_t bytes() const;

 private:
  int n_layer_, n_head_kv_, head_dim_;
  int length_ = 0;
  int capacity_ = 0;
  std::vector<std::vector<uint16_t>> k_, v_;  // per layer
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
