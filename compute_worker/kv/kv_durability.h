#ifndef PSA_COMPUTE_WORKER_KV_KV_DURABILITY_H_
#define PSA_COMPUTE_WORKER_KV_KV_DURABILITY_H_

#include <string>

#include "absl/synchronization/mutex.h"

namespace psa {

// Where a cache's leading blocks are stored in the KV service. Updated by
// whichever thread stored them; the cache's owner applies it between steps.
class KvDurability {
 public:
  void Update(const std::string& sequence_id, int blocks);  // keeps the longest
  void Get(std::string* sequence_id, int* blocks);

 private:
  absl::Mutex mu_;
  std::string id_ ABSL_GUARDED_BY(mu_);
  int blocks_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_KV_DURABILITY_H_
