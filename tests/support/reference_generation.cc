#include "tests/support/reference_generation.h"

#include "compute_worker/runtime/generator.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "gtest/gtest.h"

namespace psa::testing {

AttentionPolicy DensePolicy() {
  AttentionPolicy p;
  p.kind = AttentionPolicy::Kind::kDense;
  return p;
}

std::vector<TokenId> ReferenceTokens(const LlamaModel& model, const std::vector<TokenId>& prompt,
                                     int max_tokens, const AttentionPolicy& policy,
                                     const std::vector<bool>& retrieval_heads) {
  LlamaRuntime runtime(model, RuntimeOptions{});
  EXPECT_TRUE(runtime.SetRetrievalHeads(retrieval_heads).ok());
  auto attention = MakeAttention(policy);
  GenerationRequest request;
  request.prompt = prompt;
  request.max_tokens = max_tokens;
  request.ignore_eos = true;
  request.attention = attention.get();
  absl::StatusOr<GenerationResult> result = Generate(runtime, request);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? result->tokens : std::vector<TokenId>{};
}

}  // namespace psa::testing
