// Next-token selection from logits: greedy, or temperature sampling after
// top-k and top-p (nucleus) filtering, with a seeded generator so results
// are reproducible.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_
#define PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "compute_worker/model/tokenizer.h"

namespace psa {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // 1: no nucleus cut
  uint64_t seed = 0;

  // INVALID_ARGUMENT naming the bad field.
  absl::Status Validate() const;
};

class Sampler {
 public:
  // `tokens_done`: tokens this generation already sampled elsewhere (a
  // resumed generation); the random stream continues after their draws, so
  // a seeded generation resumed on another worker samples what it would
  // have sampled uninterrupted.
  explicit Sampler(const SamplingParams& params, int tokens_done = 0);
  TokenId Sample(const float* logits, int n_vocab);

 private:
  // Temperature 0 or top-k 1: the argmax, no random draws.
  bool greedy() const { return params_.temperature <= 0.0f || params_.top_k == 1; }
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, TokenId>> candidates_;
};

// Index of the largest logit (lowest id on ties).
TokenId ArgMax(const float* logits, int n);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_
