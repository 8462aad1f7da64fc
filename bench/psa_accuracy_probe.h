// ProbedAttention: psa_accuracy's measuring backend. It wraps a policy and,
// for every decode task, recomputes dense attention on the same cache to
// measure the output's relative error, overall and per (layer, KV head), so
// that large misses can be traced to where they happen.
//
// Owns the wrapped backend. Run may be called from the runtime's worker
// threads at once (the error sums are under a mutex); MeanRelativeError and
// Reset are for the driving thread between runs.
#ifndef PSA_BENCH_PSA_ACCURACY_PROBE_H_
#define PSA_BENCH_PSA_ACCURACY_PROBE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string_view>
#include <utility>
#include <vector>

#include "compute_worker/attention/attention.h"

namespace psa {

class ProbedAttention : public AttentionBackend {
 public:
  explicit ProbedAttention(std::unique_ptr<AttentionBackend> inner) : inner_(std::move(inner)) {}
  std::string_view name() const override { return inner_->name(); }
  void Run(const AttentionShape& shape, const AttentionTask& task) const override;
  double MeanRelativeError() const { return err_count_ ? err_sum_ / err_count_ : 0; }
  // Per (layer, KV head) of the group's output: tasks, their summed relative
  // error, and how many had one above kLargeMiss.
  static constexpr double kLargeMiss = 0.2;
  struct SiteError {
    int64_t tasks = 0, large = 0;
    double sum = 0, max = 0;
  };
  // Indexed [layer][kv_head]; empty before the first task.
  const std::vector<std::vector<SiteError>>& sites() const { return sites_; }
  void Reset() {
    err_sum_ = 0, err_count_ = 0;
    sites_.clear();
  }

 private:
  std::unique_ptr<AttentionBackend> inner_;
  DenseAttention dense_;
  mutable std::mutex mu_;
  mutable double err_sum_ = 0;
  mutable int64_t err_count_ = 0;
  mutable std::vector<std::vector<SiteError>> sites_;
};

}  // namespace psa

#endif  // PSA_BENCH_PSA_ACCURACY_PROBE_H_
