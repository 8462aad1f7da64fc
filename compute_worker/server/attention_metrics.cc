#include "compute_worker/server/attention_metrics.h"

#include <string>

#include "absl/strings/str_format.h"
#include "compute_worker/attention/sparse_attention.h"

namespace psa {

AttentionMetrics::AttentionMetrics(metrics::Registry* registry, int n_layer)
    : fraction_(registry
                    ->AddHistogram("psa_worker_attention_step_selected_fraction",
                                   "Per decode step and sequence: KV blocks read over dense's, "
                                   "by policy (and epsilon for psa)",
                                   {0.01, 0.02, 0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                                    0.75, 1.0})),
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

void AttentionMetrics::Observe(const std::vector<HeadStepStats>& stats, int n_head,
                               const AttentionBackend* attention) {
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
  if (total > 0) {
    metrics::Labels labels = {{"policy", "dense"}};
    if (const auto* sparse = dynamic_cast<const SparseAttention*>(attention)) {
      const AttentionPolicy& p = sparse->policy();
      labels = {{"policy", std::string(sparse->name())}};
      if (p.kind == AttentionPolicy::Kind::kPsa) {
        labels["epsilon"] = absl::StrFormat("%.2f", p.epsilon);
      }
    }
    fraction_.Add(labels).Observe(touched / total);
  }
  iterations_.Observe(iterations / stats.size());
}

}  // namespace psa
