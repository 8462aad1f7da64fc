#include "compute_worker/kv/cache_page_fetcher.h"

#include <cstring>

namespace psa {

void CachePageFetcher::FetchPages(const std::string&, int layer, int kv_head,
                                  std::vector<int> blocks, std::vector<uint16_t*> dsts,
                                  std::function<void(absl::Status)> done) {
  ++requests_;
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::memcpy(dsts[i], store_.Page(layer, kv_head, blocks[i]), store_.page_bytes());
  }
  done(absl::OkStatus());
}

KvCache PooledCopy(const KvCache& store, KvPaging paging) {
  KvCache kv(store.n_layer(), store.n_head_kv(), store.head_dim(), store.block_size(), paging);
  kv.Reserve(store.length());
  const int blocks = (store.length() + store.block_size() - 1) / store.block_size();
  for (int l = 0; l < store.n_layer(); ++l) {
    for (int h = 0; h < store.n_head_kv(); ++h) {
      for (int b = 0; b < blocks; ++b) {
        std::memcpy(kv.MutablePage(l, h, b), store.Page(l, h, b), store.page_bytes());
      }
    }
  }
  kv.Commit(store.length());
  kv.durability()->Update("stored", store.full_blocks());
  kv.ApplyDurability();
  return kv;
}

}  // namespace psa
