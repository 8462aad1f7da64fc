#include "compute_worker/server/attention_metrics.h"

#include <string>

namespace psa {

AttentionMetrics::AttentionMetrics(metrics::Registry* registry, int n_layer)
    : fraction_(registry
                    ->AddHistogram("psa_worker_attention_step_selected_fraction",
                                   "Per decode step and sequence: KV blocks read over dense's",
                                   {0.01, 0.02, 0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                                    0.75, 1.0})
                    .Add()),
      iterations_(registry
                      ->AddHistogram("psa_worker_attention_iterations",
                                     "Per decode step and sequence: mean progressive iterations "
                                     "per (layer, head) (1 for dense and top-k)",
                                     {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64})
                      .Add()) {
  auto& family = registry->AddHistogram(
      "psa_worker_attention_blocks_selected",
      "Per decode step and sequence: KV blocks read per query head, by layer",
      metrics::ExponentialBuckets(1, 2, 14));
  for (int l = 0; l < n_layer; ++l) {
    blocks_by_layer_.push_back(&family.Add({{"layer", std::to_string(l)}}));
  }
}

void AttentionMetrics::Observe(const std::vector<HeadStepStats>& stats, int n_head) {
  if (n_head <= 0 || stats.empty()) return;
  double touched = 0, total = 0, iterations = 0;
  const int n_layer = static_cast<int>(stats.size()) / n_head;
  for (int l = 0; l < n_layer && l < static_cast<int>(blocks_by_layer_.size()); ++l) {
    double layer_touched = 0;
    for (int h = 0; h < n_head; ++h) {
      const HeadStepStats& s = stats[static_cast<size_t>(l) * n_head + h];
      layer_touched += s.blocks_touched;
      total += s.blocks_total;
      iterations += s.iterations;
    }
    touched += layer_touched;
    blocks_by_layer_[l]->Observe(layer_touched / n_head);
  }
  if (total > 0) fraction_.Observe(touched / total);
  iterations_.Observe(iterations / stats.size());
}

}  // namespace psa
