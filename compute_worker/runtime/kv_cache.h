// Per-sequence KV cache, paged: positions are grouped into blocks of
// block_size tokens, and each (layer, block) is one allocation laid out as
//   for each KV head: K[block_size][head_dim], then V[block_size][head_dim]
// (fp16) — the KV service's block format, so a block moves between the two
// without reshaping. Every full block carries metadata per KV head — the
// per-dimension max and min of its keys — from which the sparse attention
// policies estimate a block's criticality without reading its keys.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
#define PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace psa {

// The keys (or values) of one (layer, KV head) across a cache's blocks:
// row t is head_dim fp16 values, contiguous within its block.
struct KvRows {
  const uint16_t* const* blocks = nullptr;  // base of each block
  size_t offset = 0;                        // from a block's base to this head's K or V
  int block_size = 0;
  int dim = 0;
  const uint16_t* row(int t) const {
    return blocks[t / block_size] + offset + static_cast<size_t>(t % block_size) * dim;
  }
};

class KvCache {
 public:
  static constexpr int kDefaultBlockSize = 16;
  KvCache(int n_layer, int n_head_kv, int head_dim, int block_size = kDefaultBlockSize);
  KvCache(KvCache&&) = default;
  KvCache& operator=(KvCache&&) = default;
  // Deep copies (e.g. one prefilled context reused by several policies).
  KvCache(const KvCache& other);
  KvCache& operator=(const KvCache& other);

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_head_kv_; }
  int head_dim() const { return head_dim_; }
  // Positions committed (visible to attention).
  int length() const { return length_; }
  int capacity() const { return capacity_; }
  int block_size() const { return block_size_; }
  // Blocks whose block_size positions are all committed (metadata valid).
  int full_blocks() const { return length_ / block_size_; }
  // Elements (fp16) of one (layer, block): K and V of every head.
  size_t block_elements() const {
    return static_cast<size_t>(2) * n_head_kv_ * block_size_ * head_dim_;
  }

  // Makes room for `n` positions in total (keeps contents).
  void Reserve(int n);
  // Writable slot for position pos (< capacity) of (layer, head).
  uint16_t* KeySlot(int layer, int head, int pos) {
    return blocks_[layer][pos / block_size_] + HeadOffset(head) +
           static_cast<size_t>(pos % block_size_) * head_dim_;
  }
  uint16_t* ValueSlot(int layer, int head, int pos) {
    return KeySlot(layer, head, pos) + static_cast<size_t>(block_size_) * head_dim_;
  }
  // Block b (< capacity / block_size) of a layer, in the layout above.
  const uint16_t* Block(int layer, int b) const { return blocks_[layer][b]; }
  uint16_t* MutableBlock(int layer, int b) { return blocks_[layer][b]; }
  KvRows Keys(int layer, int head) const {
    return KvRows{blocks_[layer].data(), HeadOffset(head), block_size_, head_dim_};
  }
  KvRows Values(int layer, int head) const {
    return KvRows{blocks_[layer].data(),
                  HeadOffset(head) + static_cast<size_t>(block_size_) * head_dim_, block_size_,
                  head_dim_};
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
  size_t HeadOffset(int head) const {
    return static_cast<size_t>(head) * 2 * block_size_ * head_dim_;
  }

  int n_layer_, n_head_kv_, head_dim_, block_size_;
  int length_ = 0;
  int capacity_ = 0;  // a multiple of block_size_
  // Carves `count` blocks out of slabs (huge-page backed when large).
  void AllocateBlocks(int layer, size_t count);
  struct FreeSlab {
    void operator()(uint16_t* p) const;
  };

  std::vector<std::vector<uint16_t*>> blocks_;               // [layer][block] -> base
  std::vector<std::unique_ptr<uint16_t, FreeSlab>> slabs_;  // the allocations
  uint16_t* slab_next_ = nullptr;  // free space left in the newest slab
  size_t slab_left_ = 0;           // in blocks
  std::vector<std::vector<uint16_t>> kmax_, kmin_;  // per layer: [head][max_blocks][dim]
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_KV_CACHE_H_
