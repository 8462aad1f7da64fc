#include "compute_worker/kv/kv_durability.h"

namespace psa {

void KvDurability::Update(const std::string& sequence_id, int blocks) {
  absl::MutexLock lock(&mu_);
  if (blocks <= blocks_) return;
  id_ = sequence_id;
  blocks_ = blocks;
}

void KvDurability::Get(std::string* sequence_id, int* blocks) {
  absl::MutexLock lock(&mu_);
  *sequence_id = id_;
  *blocks = blocks_;
}

}  // namespace psa
