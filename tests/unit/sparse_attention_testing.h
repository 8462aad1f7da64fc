// Helpers shared by the sparse_attention_test sources: synthetic KV caches,
// random queries, one-task attention runs and the tests' own reference
// computations (block masses, bound order).
#ifndef PSA_TESTS_UNIT_SPARSE_ATTENTION_TESTING_H_
#define PSA_TESTS_UNIT_SPARSE_ATTENTION_TESTING_H_

#include <cstdint>
#include <vector>

#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/kv/kv_cache.h"

namespace psa::testing {

constexpr int kHeadDim = 64;

// Dense rounds probabilities to fp16 (llama.cpp parity); the sparse engine
// keeps them in fp32, so "equal" means within that rounding.
constexpr double kSameAsDense = 2e-3;

// A one-layer cache with random keys/values; `hot` blocks get keys aligned
// with `dir` (so a query along dir concentrates its attention there) and
// all-ones values (so the right answer is easy to tell from noise).
KvCache RandomCache(int n_head_kv, int length, int block, uint32_t seed,
                    const std::vector<int>& hot = {}, const std::vector<float>& dir = {},
                    int head_dim = kHeadDim);

struct Output {
  std::vector<float> out;
  std::vector<HeadStepStats> stats;
};

// One decode step (the cache's last position) of `kv_head`'s query group,
// the task marked as a retrieval head's or not (AttentionTask::retrieval_head).
Output Attend(const AttentionBackend& backend, const AttentionShape& shape, KvCache& kv,
              const std::vector<float>& q, int kv_head, bool retrieval_head = false);

// Attention for `rows` prompt rows ending at position `end` - 1 (default:
// the cache's last), as one task of a prefill pass in which the sequence
// has `entry_rows` rows.
std::vector<float> AttendRows(const AttentionBackend& backend, const AttentionShape& shape,
                              KvCache& kv, const float* q, int rows, int entry_rows,
                              HeadStepStats* last_stats = nullptr, int end = -1);

double RelErr(const std::vector<float>& a, const std::vector<float>& ref);

std::vector<float> RandomQuery(int heads, uint32_t seed, float scale = 1.0f,
                               int head_dim = kHeadDim);

// Plain PSA: no budget floor, the default tail estimate.
AttentionPolicy Psa(float eps, bool certified = false);

AttentionPolicy TopK(int k);

// Each block's exact attention mass sum_t exp(scale * q.k_t) for a
// one-head query, the test's own computation.
std::vector<double> BlockMasses(const KvCache& kv, const std::vector<float>& q, float scale);

// The candidate blocks (all but the first and the last of a cache of full
// blocks) in the order `rank` takes them for a one-head query.
std::vector<int> CandidatesInOrder(const KvCache& kv, const std::vector<float>& q, float scale,
                                   AttentionPolicy::Rank rank);

}  // namespace psa::testing

#endif  // PSA_TESTS_UNIT_SPARSE_ATTENTION_TESTING_H_
