// Next-token selection from logits: greedy, or temperature sampling after
// top-k and top-p (nucleus) filtering, with a seeded generator so results
// are reproducible. Optional repetition, frequency and presence penalties
// adjust the logits first, from the tokens seen so far.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_
#define PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "compute_worker/model/tokenizer.h"

namespace psa {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // 1: no nucleus cut
  uint64_t seed = 0;
  // Penalties, applied to the logits before temperature, top-k, top-p and
  // greedy argmax, in this order (as vLLM does). Their defaults are off.
  // vLLM's (CTRL-style), > 0: every token of the prompt or the generated
  // tokens has its logit divided by it if positive, else multiplied by it.
  float repetition_penalty = 1.0f;  // 1: off
  // OpenAI's, in [-2, 2]: logit -= frequency_penalty * count, then
  // logit -= presence_penalty if count > 0, where count is how many times
  // the token was generated so far (prompt tokens do not count).
  float frequency_penalty = 0.0f;  // 0: off
  float presence_penalty = 0.0f;   // 0: off

  bool penalized() const {
    return repetition_penalty != 1.0f || frequency_penalty != 0.0f || presence_penalty != 0.0f;
  }
  // INVALID_ARGUMENT naming the bad field.
  absl::Status Validate() const;
};

class Sampler {
 public:
  // `context`: the prompt, of which the last `tokens_done` tokens were
  // generated already, elsewhere (a resumed generation; the layout of
  // GenerationRequest::prompt and ::resumed). The random stream continues
  // after their draws and the penalties count them as generated, so a
  // generation resumed on another worker samples what it would have
  // sampled uninterrupted. Only the penalties read `context`.
  explicit Sampler(const SamplingParams& params, absl::Span<const TokenId> context = {},
                   int tokens_done = 0);
  // The next token; it counts as generated for the penalties from then on.
  // Without penalties the logits are used as they are; with them, a copy
  // is adjusted at the tokens seen so far only.
  TokenId Sample(const float* logits, int n_vocab);
  // Applies the penalties for the tokens seen so far to `logits` in place
  // (nothing when the params have none).
  void ApplyPenalties(float* logits, int n_vocab) const;

 private:
  struct Seen {
    int generated = 0;       // times generated
    bool in_prompt = false;  // in the prompt (tracked for repetition_penalty only)
  };
  // Today's selection on logits as given.
  TokenId Pick(const float* logits, int n_vocab);
  // Temperature 0 or top-k 1: the argmax, no random draws.
  bool greedy() const { return params_.temperature <= 0.0f || params_.top_k == 1; }
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, TokenId>> candidates_;
  absl::flat_hash_map<TokenId, Seen> seen_;  // filled only when penalized
  std::vector<float> penalized_;             // the adjusted logits
};

// Index of the largest logit (lowest id on ties).
TokenId ArgMax(const float* logits, int n);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_SAMPLER_H_
