#ifndef PSA_COMPUTE_WORKER_KV_PAGE_FETCHER_H_
#define PSA_COMPUTE_WORKER_KV_PAGE_FETCHER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace psa {

// Copies pages back from the KV service (the worker implements it over
// KvClient). Thread-safe.
class PageFetcher {
 public:
  virtual ~PageFetcher() = default;
  // Copies head `kv_head` of blocks `blocks` of `layer` of the stored
  // sequence to dsts[i] (one page each), then calls `done` once, on any
  // thread. May wait while too many fetches are in flight.
  virtual void FetchPages(const std::string& sequence_id, int layer, int kv_head,
                          std::vector<int> blocks, std::vector<uint16_t*> dsts,
                          std::function<void(absl::Status)> done) = 0;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_PAGE_FETCHER_H_
