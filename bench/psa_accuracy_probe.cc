#include "bench/psa_accuracy_probe.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace psa {

void ProbedAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  inner_->Run(shape, task);
  // Through a pool, dense would fetch every page and change what is resident.
  if (task.n_q != 1 || task.prefill || task.kv->paged()) return;
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
  const double err = std::sqrt(num / std::max(den, 1e-30));
  std::lock_guard<std::mutex> lock(mu_);
  err_sum_ += err;
  ++err_count_;
  if (sites_.size() <= static_cast<size_t>(task.layer)) sites_.resize(task.layer + 1);
  auto& layer = sites_[task.layer];
  if (layer.size() <= static_cast<size_t>(task.kv_head)) layer.resize(task.kv_head + 1);
  SiteError& e = layer[task.kv_head];
  ++e.tasks;
  e.sum += err;
  e.max = std::max(e.max, err);
  e.large += err > kLargeMiss;
}

}  // namespace psa
