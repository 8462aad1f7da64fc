// Prometheus metrics: counters, gauges and histograms with labels, and the
// text exposition format (version 0.0.4) that Prometheus scrapes.
//
// prometheus-cpp is not packaged in Debian bookworm, so this is the small
// subset the services need. Metric objects live as long as their Registry,
// or until their family's Remove() of their labels; updating one is
// lock-free (atomics), creating or removing one takes a lock. Thread-safe.
#ifndef PSA_COMMON_METRICS_H_
#define PSA_COMMON_METRICS_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace psa::metrics {

using Labels = std::map<std::string, std::string>;

class Counter {
 public:
  void Increment(double by = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double by);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `bounds` are the upper bounds of the buckets, ascending; +Inf is implied.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound plus the +Inf bucket, sum and count.
  void Snapshot(std::vector<uint64_t>* cumulative, double* sum, uint64_t* count) const;

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

// Bucket bounds: `count` values from `start`, each `factor` times the last.
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// Latency buckets from 0.5 ms to ~30 s.
std::vector<double> LatencyBuckets();

template <typename M>
class Family;

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Names must follow Prometheus rules; `help` is one line.
  Family<Counter>& AddCounter(const std::string& name, const std::string& help);
  Family<Gauge>& AddGauge(const std::string& name, const std::string& help);
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<double> bounds);

  // Runs before every Serialize(): for gauges computed from other state.
  void AddCollector(std::function<void()> collect);

  // All metrics in the text exposition format.
  std::string Serialize();

 private:
  struct FamilyBase {
    std::string name, help, type;
    virtual ~FamilyBase() = default;
    virtual void Write(std::string* out) = 0;
  };
  template <typename M>
  friend class Family;
  template <typename M>
  Family<M>& AddFamily(const std::string& name, const std::string& help, const char* type,
                       std::vector<double> bounds);

  absl::Mutex mu_;
  std::vector<std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> collectors_;
};

// One metric name with any number of label sets.
template <typename M>
class Family : public Registry::FamilyBase {
 public:
  // The metric with these labels, created on first use.
  M& Add(const Labels& labels = {});
  // Deletes the series with these labels (e.g. of a worker that left), so
  // the exposition no longer shows it; false if there was none. References
  // Add() returned for these labels dangle after it: the caller must make
  // sure nothing still updates them (a later Add() starts a new series).
  bool Remove(const Labels& labels);
  // Number of series (label sets) in the family.
  size_t size();
  void Write(std::string* out) override;

 private:
  friend class Registry;
  std::vector<double> bounds_;  // histograms only
  absl::Mutex mu_;
  std::map<Labels, std::unique_ptr<M>> metrics_;
};

}  // namespace psa::metrics

#endif  // PSA_COMMON_METRICS_H_
