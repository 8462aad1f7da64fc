#include "common/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"

namespace psa::metrics {
namespace {

void AtomicAdd(std::atomic<double>* a, double by) {
  double old = a->load(std::memory_order_relaxed);
  while (!a->compare_exchange_weak(old, old + by, std::memory_order_relaxed)) {
  }
}

std::string FormatValue(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  // Whole numbers (counts, bytes) exactly; others with full precision.
  if (v == std::floor(v) && std::fabs(v) < 9e15) return absl::StrCat(int64_t(v));
  // The shortest form that reads back exactly ("2.048", not
  // "2.0480000000000000"): rules and dashboards match `le` labels as text.
  for (int precision = 15; precision < 17; ++precision) {
    std::string s = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(s.c_str(), nullptr) == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

std::string EscapeLabel(const std::string& v) {
  return absl::StrReplaceAll(v, {{"\\", "\\\\"}, {"\"", "\\\""}, {"\n", "\\n"}});
}

// `{a="x",b="y"}` with an optional extra label (histogram `le`), or "".
std::string LabelString(const Labels& labels, const std::string& extra_name = "",
                        const std::string& extra_value = "") {
  std::string s;
  for (const auto& [k, v] : labels) {
    absl::StrAppend(&s, s.empty() ? "" : ",", k, "=\"", EscapeLabel(v), "\"");
  }
  if (!extra_name.empty()) {
    absl::StrAppend(&s, s.empty() ? "" : ",", extra_name, "=\"", extra_value, "\"");
  }
  return s.empty() ? s : absl::StrCat("{", s, "}");
}

}  // namespace

void Counter::Increment(double by) {
  if (by > 0) AtomicAdd(&value_, by);  // counters never go down
}

void Gauge::Add(double by) { AtomicAdd(&value_, by); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)),
      counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double v) {
  const size_t bucket =
      std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(&sum_, v);
}

void Histogram::Snapshot(std::vector<uint64_t>* cumulative, double* sum,
                         uint64_t* count) const {
  cumulative->resize(bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    (*cumulative)[i] = running;
  }
  *count = running;
  *sum = sum_.load(std::memory_order_relaxed);
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  for (int i = 0; i < count; ++i, start *= factor) b.push_back(start);
  return b;
}

std::vector<double> LatencyBuckets() { return ExponentialBuckets(0.0005, 2.0, 17); }

template <typename M>
M& Family<M>::Add(const Labels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = metrics_[labels];
  if (slot == nullptr) {
    if constexpr (std::is_same_v<M, Histogram>) {
      slot = std::make_unique<Histogram>(bounds_);
    } else {
      slot = std::make_unique<M>();
    }
  }
  return *slot;
}

template <typename M>
bool Family<M>::Remove(const Labels& labels) {
  std::unique_ptr<M> removed;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  auto it = metrics_.find(labels);
  if (it == metrics_.end()) return false;
  removed = std::move(it->second);
  metrics_.erase(it);
  return true;
}

template <typename M>
size_t Family<M>::size() {
  absl::MutexLock lock(&mu_);
  return metrics_.size();
}

template <typename M>
void Family<M>::Write(std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  absl::MutexLock lock(&mu_);
  for (const auto& [labels, metric] : metrics_) {
    if constexpr (std::is_same_v<M, Histogram>) {
      std::vector<uint64_t> cumulative;
      double sum;
      uint64_t count;
      metric->Snapshot(&cumulative, &sum, &count);
      for (size_t i = 0; i < cumulative.size(); ++i) {
        const double le = i < bounds_.size() ? bounds_[i] : INFINITY;
        absl::StrAppend(out, name, "_bucket", LabelString(labels, "le", FormatValue(le)),
                        " ", cumulative[i], "\n");
      }
      absl::StrAppend(out, name, "_sum", LabelString(labels), " ", FormatValue(sum), "\n");
      absl::StrAppend(out, name, "_count", LabelString(labels), " ", count, "\n");
    } else {
      absl::StrAppend(out, name, LabelString(labels), " ", FormatValue(metric->Value()),
                      "\n");
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

template <typename M>
Family<M>& Registry::AddFamily(const std::string& name, const std::string& help,
                               const char* type, std::vector<double> bounds) {
  auto family = std::make_unique<Family<M>>();
  family->name = name;
  family->help = help;
  family->type = type;
  family->bounds_ = std::move(bounds);
  Family<M>& ref = *family;
  absl::MutexLock lock(&mu_);
  families_.push_back(std::move(family));
  return ref;
}

Family<Counter>& Registry::AddCounter(const std::string& name, const std::string& help) {
  return AddFamily<Counter>(name, help, "counter", {});
}

Family<Gauge>& Registry::AddGauge(const std::string& name, const std::string& help) {
  return AddFamily<Gauge>(name, help, "gauge", {});
}

Family<Histogram>& Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<double> bounds) {
  return AddFamily<Histogram>(name, help, "histogram", std::move(bounds));
}

void Registry::AddCollector(std::function<void()> collect) {
  absl::MutexLock lock(&mu_);
  collectors_.push_back(std::move(collect));
}

std::string Registry::Serialize() {
  absl::MutexLock lock(&mu_);
  for (auto& collect : collectors_) collect();
  std::string out;
  for (auto& family : families_) family->Write(&out);
  return out;
}

}  // namespace psa::metrics
