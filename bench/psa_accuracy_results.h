// psa_accuracy's figures: one row per (context, policy), what each decode
// step adds to it, and the table and CSV files they are reported in.
//
// Plain values and functions: a PolicyResult is owned by its caller and is
// not synchronized (fill it from one thread).
#ifndef PSA_BENCH_PSA_ACCURACY_RESULTS_H_
#define PSA_BENCH_PSA_ACCURACY_RESULTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "compute_worker/attention/attention.h"

namespace psa {

struct PolicyResult {
  std::string policy;
  int context = 0;
  int steps = 0;
  int agree = 0;
  double kl_sum = 0;
  double rel_err = 0;
  int64_t touched = 0, total = 0;  // blocks over (layer, query head, step)
  // Blocks read per (layer, KV head, step): the union over the GQA group,
  // which is what memory traffic (and a fetch from the KV service) costs.
  int64_t read = 0, read_total = 0;
  double captured_sum = 0;
  int64_t captured_n = 0;
  double iterations_sum = 0;
  int needles_found = 0, needles = 0;
  std::vector<double> layer_touched, layer_total;
  // Every step's KL, for the tail: a policy that is fine on average can
  // still lose the answer on the rare steps where a head stopped too early.
  std::vector<double> step_kl;
  double KlQuantile(double q) const;   // q in [0, 1]; 0 when no steps
  double KlTailShare(double top) const;  // share of the KL sum in the worst `top` of steps
  // Per (layer, KV head): mean and max relative error of the attention
  // output, share of tasks over ProbedAttention::kLargeMiss.
  struct Site {
    int layer, kv_head;
    double mean, max, large_share;
  };
  std::vector<Site> sites;
  double Agreement() const { return steps ? static_cast<double>(agree) / steps : 0; }
  double KvFraction() const { return total ? static_cast<double>(touched) / total : 0; }
  double ReadFraction() const { return read_total ? static_cast<double>(read) / read_total : 0; }
  // --pool_fraction: pages fetched, over the pages dense reads (read_total).
  int64_t fetched = 0;
  double FetchFraction() const { return read_total ? static_cast<double>(fetched) / read_total : 0; }
};

// The softmax of `n` logits, and KL(p || q).
std::vector<double> Softmax(const float* logits, int n);
double Kl(const std::vector<double>& p, const std::vector<double>& q);

// Adds one decode step's per-(layer, query head) stats to `r`; `group`
// query heads share a KV head.
void Accumulate(const std::vector<HeadStepStats>& stats, int n_head, int group,
                PolicyResult* r);

// The results table, on stdout.
void PrintResults(const std::vector<PolicyResult>& results, int n_head);
// Per-(context, policy) rows, and PSA's per-layer KV fraction, as CSV files
// (a line on stderr names each).
void WriteResultsCsv(const std::string& path, const std::vector<PolicyResult>& results);
void WriteLayersCsv(const std::string& path, const std::vector<PolicyResult>& results);
// Every teacher-forced step's KL against dense, per policy (steps of all
// windows in order).
void WriteStepsCsv(const std::string& path, const std::vector<PolicyResult>& results);
// Per-(layer, KV head) output errors of every policy.
void WriteSitesCsv(const std::string& path, const std::vector<PolicyResult>& results);

}  // namespace psa

#endif  // PSA_BENCH_PSA_ACCURACY_RESULTS_H_
