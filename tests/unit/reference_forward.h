// Test support: a straightforward double-precision forward pass that the
// runtime's results are checked against, and helpers to build tiny models.
#ifndef PSA_TESTS_UNIT_REFERENCE_FORWARD_H_
#define PSA_TESTS_UNIT_REFERENCE_FORWARD_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "compute_worker/model/llama_model.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {

// Loads the tiny model of `spec` through a temp file (null and a test
// failure if it does not load).
std::unique_ptr<LlamaModel> TinyModel(const testing::TinyModelSpec& spec);
// Every row of w as floats.
std::vector<float> Dequantize(const WeightMatrix& w);
// The last position's logits of `tokens` evaluated from an empty cache: no
// batching, no quantised activations, double precision throughout.
std::vector<double> ReferenceForward(const LlamaModel& m, const std::vector<TokenId>& tokens);
std::vector<TokenId> RandomTokens(int n, int vocab, uint32_t seed);

// The runtime's last-position logits for `tokens` (one prefill from an empty
// cache) beside ReferenceForward's, with the largest absolute difference and
// the largest reference logit.
struct ReferenceComparison {
  std::vector<float> got;
  std::vector<double> want;
  double max_err = 0, max_ref = 0;
  bool ok = false;  // the prefill succeeded
};
ReferenceComparison CompareWithReference(const LlamaModel& m, const std::vector<TokenId>& tokens);

}  // namespace psa

#endif  // PSA_TESTS_UNIT_REFERENCE_FORWARD_H_
