// What the in-process runtime generates: the reference that tests compare
// servers (worker, router, SDKs) against, token for token.
#ifndef PSA_TESTS_SUPPORT_REFERENCE_GENERATION_H_
#define PSA_TESTS_SUPPORT_REFERENCE_GENERATION_H_

#include <vector>

#include "compute_worker/model/llama_model.h"
#include "compute_worker/attention/sparse_attention.h"

namespace psa::testing {

AttentionPolicy DensePolicy();

// Greedy tokens after `prompt`, ignoring EOS, on a fresh runtime over
// `model` with `retrieval_heads` marked (LlamaRuntime::SetRetrievalHeads:
// pass what the server marks, e.g. the registry's for the file, when the
// policy is sparse); empty (and a test failure) if generation fails.
std::vector<TokenId> ReferenceTokens(const LlamaModel& model, const std::vector<TokenId>& prompt,
                                     int max_tokens, const AttentionPolicy& policy = DensePolicy(),
                                     const std::vector<bool>& retrieval_heads = {});

}  // namespace psa::testing

#endif  // PSA_TESTS_SUPPORT_REFERENCE_GENERATION_H_
