// AttentionMetrics: what the attention policy did at each decode step, as
// Prometheus histograms: blocks selected per layer, the fraction of the KV
// read (by policy, and for psa by epsilon to two decimals: at most ~100
// series), and PSA's progressive iterations.
#ifndef PSA_COMPUTE_WORKER_SERVER_ATTENTION_METRICS_H_
#define PSA_COMPUTE_WORKER_SERVER_ATTENTION_METRICS_H_

#include <vector>

#include "common/metrics.h"
#include "compute_worker/attention/attention.h"

namespace psa {

class AttentionMetrics {
 public:
  AttentionMetrics(metrics::Registry* registry, int n_layer);
  // One sequence's decode step: stats[layer * n_head + head], by
  // `attention` (null: dense).
  void Observe(const std::vector<HeadStepStats>& stats, int n_head,
               const AttentionBackend* attention);

 private:
  std::vector<metrics::Histogram*> blocks_by_layer_;
  metrics::Family<metrics::Histogram>& fraction_;
  metrics::Histogram& iterations_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_ATTENTION_METRICS_H_
