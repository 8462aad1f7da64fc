// KvPageFetcher: the worker's PageFetcher, over the KV service's FetchBlocks
// streams — one query per call, for one KV head's part of each block, so
// the bytes moved are exactly the pages attention reads.
#ifndef PSA_COMPUTE_WORKER_SERVER_KV_PAGE_FETCHER_H_
#define PSA_COMPUTE_WORKER_SERVER_KV_PAGE_FETCHER_H_

#include "absl/time/time.h"
#include "compute_worker/kv/kv_cache.h"
#include "kv_service/kv_client.h"

namespace psa {

class KvPageFetcher : public PageFetcher {
 public:
  // `client` outlives the fetcher; a fetch not answered within `timeout`
  // fails with DEADLINE_EXCEEDED.
  KvPageFetcher(KvClient* client, size_t page_bytes, absl::Duration timeout)
      : client_(client), page_bytes_(page_bytes), timeout_(timeout) {}

  void FetchPages(const std::string& sequence_id, int layer, int kv_head,
                  std::vector<int> blocks, std::vector<uint16_t*> dsts,
                  std::function<void(absl::Status)> done) override;

 private:
  KvClient* const client_;
  const size_t page_bytes_;
  const absl::Duration timeout_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_KV_PAGE_FETCHER_H_
