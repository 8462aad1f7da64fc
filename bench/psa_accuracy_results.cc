#include "bench/psa_accuracy_results.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/strings/str_format.h"

namespace psa {

std::vector<double> Softmax(const float* logits, int n) {
  std::vector<double> p(n);
  const float mx = *std::max_element(logits, logits + n);
  double s = 0;
  for (int i = 0; i < n; ++i) s += (p[i] = std::exp(static_cast<double>(logits[i]) - mx));
  for (double& x : p) x /= s;
  return p;
}

double Kl(const std::vector<double>& p, const std::vector<double>& q) {
  double kl = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] > 0) kl += p[i] * (std::log(p[i]) - std::log(std::max(q[i], 1e-300)));
  }
  return kl;
}

double PolicyResult::KlQuantile(double q) const {
  if (step_kl.empty()) return 0;
  std::vector<double> v = step_kl;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

double PolicyResult::KlTailShare(double top) const {
  if (step_kl.empty()) return 0;
  std::vector<double> v = step_kl;
  std::sort(v.begin(), v.end(), std::greater<>());
  const size_t n = std::max<size_t>(1, static_cast<size_t>(top * v.size() + 0.5));
  double head = 0, all = 0;
  for (size_t i = 0; i < v.size(); ++i) (i < n ? head : all) += v[i];
  all += head;
  return all > 0 ? head / all : 0;
}

void Accumulate(const std::vector<HeadStepStats>& stats, int n_head, int group,
                PolicyResult* r) {
  const int n_layer = static_cast<int>(stats.size()) / n_head;
  for (int l = 0; l < n_layer; ++l) {
    for (int h0 = 0; h0 < n_head; h0 += group) {
      int most = 0;
      for (int h = h0; h < h0 + group; ++h) {
        most = std::max(most, stats[static_cast<size_t>(l) * n_head + h].blocks_touched);
      }
      r->read += most;
      r->read_total += stats[static_cast<size_t>(l) * n_head + h0].blocks_total;
    }
  }
  r->layer_touched.resize(n_layer, 0);
  r->layer_total.resize(n_layer, 0);
  for (int l = 0; l < n_layer; ++l) {
    for (int h = 0; h < n_head; ++h) {
      const HeadStepStats& s = stats[static_cast<size_t>(l) * n_head + h];
      r->touched += s.blocks_touched;
      r->total += s.blocks_total;
      r->layer_touched[l] += s.blocks_touched;
      r->layer_total[l] += s.blocks_total;
      r->iterations_sum += s.iterations;
      if (s.captured >= 0) {
        r->captured_sum += s.captured;
        ++r->captured_n;
      }
    }
  }
}

void PrintResults(const std::vector<PolicyResult>& results, int n_head) {
  std::printf("%-7s %-24s %8s %10s %9s %9s %9s %8s %8s %8s %9s %6s %8s\n", "context", "policy",
              "top1", "KL", "KL p99", "KL top5%", "relerr", "KV frac", "KV read", "fetched",
              "captured", "iters", "needle");
  for (const PolicyResult& r : results) {
    std::printf("%-7d %-24s %8.4f %10.6f %9.5f %9.3f %9.5f %8.4f %8.4f %8.4f %9s %6.2f %8s\n",
                r.context, r.policy.c_str(), r.Agreement(), r.steps ? r.kl_sum / r.steps : 0.0,
                r.KlQuantile(0.99), r.KlTailShare(0.05), r.rel_err,
                r.KvFraction(), r.policy == "dense" ? 1.0 : r.ReadFraction(), r.FetchFraction(),
                r.captured_n ? absl::StrFormat("%.4f", r.captured_sum / r.captured_n).c_str() : "-",
                r.layer_total.empty()
                    ? 1.0
                    : r.iterations_sum / (static_cast<double>(r.layer_total.size()) * n_head * r.steps),
                r.needles ? absl::StrFormat("%d/%d", r.needles_found, r.needles).c_str() : "-");
  }
}

void WriteResultsCsv(const std::string& path, const std::vector<PolicyResult>& results) {
  std::ofstream out(path);
  out << "context,policy,kind,top1,kl,rel_err,kv_fraction,kv_read_fraction,captured,"
         "needles_found,needles,fetch_fraction,kl_p99,kl_max,kl_top5_share\n";
  for (const PolicyResult& r : results) {
    const std::string kind = r.policy.substr(0, r.policy.find('('));
    out << r.context << ",\"" << r.policy << "\"," << kind << "," << r.Agreement() << ","
        << (r.steps ? r.kl_sum / r.steps : 0) << "," << r.rel_err << "," << r.KvFraction() << ","
        << (r.policy == "dense" ? 1.0 : r.ReadFraction()) << ","
        << (r.captured_n ? r.captured_sum / r.captured_n : -1) << "," << r.needles_found << ","
        << r.needles << "," << r.FetchFraction() << "," << r.KlQuantile(0.99) << ","
        << r.KlQuantile(1.0) << "," << r.KlTailShare(0.05) << "\n";
  }
  std::cerr << "wrote " << path << "\n";
}

void WriteLayersCsv(const std::string& path, const std::vector<PolicyResult>& results) {
  std::ofstream out(path);
  out << "context,policy,layer,kv_fraction\n";
  for (const PolicyResult& r : results) {
    for (size_t l = 0; l < r.layer_total.size(); ++l) {
      out << r.context << ",\"" << r.policy << "\"," << l << ","
          << (r.layer_total[l] ? r.layer_touched[l] / r.layer_total[l] : 0) << "\n";
    }
  }
  std::cerr << "wrote " << path << "\n";
}

void WriteStepsCsv(const std::string& path, const std::vector<PolicyResult>& results) {
  std::ofstream out(path);
  out << "context,policy,step,kl\n";
  for (const PolicyResult& r : results) {
    for (size_t s = 0; s < r.step_kl.size(); ++s) {
      out << r.context << ",\"" << r.policy << "\"," << s << "," << r.step_kl[s] << "\n";
    }
  }
  std::cerr << "wrote " << path << "\n";
}

void WriteSitesCsv(const std::string& path, const std::vector<PolicyResult>& results) {
  std::ofstream out(path);
  out << "context,policy,layer,kv_head,rel_err_mean,rel_err_max,large_miss_share\n";
  for (const PolicyResult& r : results) {
    for (const PolicyResult::Site& s : r.sites) {
      out << r.context << ",\"" << r.policy << "\"," << s.layer << "," << s.kv_head << ","
          << s.mean << "," << s.max << "," << s.large_share << "\n";
    }
  }
  std::cerr << "wrote " << path << "\n";
}

}  // namespace psa
