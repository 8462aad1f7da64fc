#include "bench/psa_accuracy_probe.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace psa {

void ProbedAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  inner_->Run(shape, task);
  // Through a pool, dense would fetch every page and change what is resident.
  if (task.n_q != 1 || task.kv->paged()) return;
  const int n = shape.group() * shape.head_dim;
  std::vector<float> ref(n);
  AttentionTask t = task;
  t.out = ref.data();
  t.stats = nullptr;
  dense_.Run(shape, t);
  double num = 0, den = 0;
  for (int i = 0; i < n; ++i) {
    num += (task.out[i] - ref[i]) * (task.out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  std::lock_guard<std::mutex> lock(mu_);
  err_sum_ += std::sqrt(num / std::max(den, 1e-30));
  ++err_count_;
}

}  // namespace psa
