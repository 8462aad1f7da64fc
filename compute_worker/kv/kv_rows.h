#ifndef PSA_COMPUTE_WORKER_KV_KV_ROWS_H_
#define PSA_COMPUTE_WORKER_KV_KV_ROWS_H_

#include <cstddef>
#include <cstdint>

namespace psa {

// The keys (or values) of one (layer, KV head) across a cache's blocks:
// row t is head_dim fp16 values, contiguous within its page.
struct KvRows {
  const uint16_t* const* pages = nullptr;  // base of each block's page
  size_t offset = 0;                       // from a page's base to its K or V
  int block_size = 0;
  int dim = 0;
  const uint16_t* row(int t) const {
    return pages[t / block_size] + offset + static_cast<size_t>(t % block_size) * dim;
  }
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_KV_ROWS_H_
