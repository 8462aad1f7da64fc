// Helpers of the GPU tests: peaked synthetic KV caches, their upload into
// the CUDA kernels' paged layout, the CPU engine's selection (order and
// stop scores) and one decode step on either side.
#ifndef PSA_TESTS_GPU_GPU_TESTING_H_
#define PSA_TESTS_GPU_GPU_TESTING_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/attention_policy.h"
#include "compute_worker/attention/attention.h"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/kv/kv_cache.h"

namespace psa::gpu_testing {

// True when a CUDA device is usable; else false and why.
bool HaveDevice(std::string* why);

// In a test body or SetUp: skips the test, saying why, without a device.
#define PSA_SKIP_WITHOUT_GPU()                                                   \
  do {                                                                           \
    std::string why_;                                                            \
    if (!::psa::gpu_testing::HaveDevice(&why_)) {                                \
      GTEST_SKIP() << "no usable CUDA device (" << why_ << "): GPU test skipped"; \
    }                                                                            \
  } while (0)

// A device allocation of n T's, freed with the owner.
template <typename T>
struct DeviceArray {
  std::shared_ptr<void> mem;
  size_t n = 0;
  T* get() const { return static_cast<T*>(mem.get()); }
};
template <typename T>
DeviceArray<T> ToDevice(const std::vector<T>& host);
template <typename T>
DeviceArray<T> DeviceZeros(size_t n);
template <typename T>
std::vector<T> ToHost(const DeviceArray<T>& dev);

// Shapes of one test case.
struct Shape {
  int n_head_kv = 2;
  int group = 1;
  int head_dim = 64;
  int n_head() const { return n_head_kv * group; }
  float scale() const;
  AttentionShape cpu() const;
};

// A batch of one-layer caches with peaked keys (about one block in 16
// aligned with its KV head's direction) and queries along those
// directions: q is [seq][n_head][head_dim].
struct Batch {
  Shape shape;
  std::vector<std::unique_ptr<KvCache>> caches;
  std::vector<float> q;
  int max_len = 0;
};
Batch MakeBatch(const Shape& shape, const std::vector<int>& lengths, uint32_t seed);

// The batch in the kernels' layout (device memory).
struct DeviceBatch {
  DeviceArray<uint16_t> pool, kmax, kmin, kmean;
  DeviceArray<const uint16_t*> pages;
  DeviceArray<int> table, seq_len;
  DeviceArray<float> q;
  cuda::PagedKv view;
};
DeviceBatch Upload(const Batch& b);

// The CPU engine's selection for every (sequence, KV head): candidates in
// BlockRanking's order of BlockBounds' scores, and its stop scores (centre,
// or bounds with `certified`), laid out as cuda::Candidates wants.
struct HostCandidates {
  std::vector<int> begin, order;
  std::vector<float> stop_x;
  int max_n_cand = 0;
};
HostCandidates CpuSelection(const Batch& b, const AttentionPolicy& p);

cuda::Selection ToSelection(const AttentionPolicy& p);

// One decode step's results, [seq][n_head] (x head_dim for out).
struct Result {
  std::vector<float> out;
  std::vector<int> blocks, iterations;
  std::vector<float> captured;
};
Result CpuDecode(const AttentionBackend& backend, const Batch& b);
// sm_count <= 0: no split-KV in dense mode.
Result GpuDecode(cuda::DecodeMode mode, const AttentionPolicy& p, const Batch& b,
                 const DeviceBatch& dev, const HostCandidates* cand, int sm_count);

// Relative L2 error of head x's output (x in [0, seq * n_head)).
double HeadRelErr(const Result& a, const Result& ref, int x, int head_dim);

}  // namespace psa::gpu_testing

#endif  // PSA_TESTS_GPU_GPU_TESTING_H_
