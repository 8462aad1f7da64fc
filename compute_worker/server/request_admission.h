// Admission of a psa.v1.GenerateRequest on a compute worker: the checks
// that need no tokenizing (they run on gRPC's callback thread, before any
// work is queued), the context check of a text by its size alone, and the
// conversion of the request's fields to a GenerationRequest. A refusal is
// INVALID_ARGUMENT naming the field and the value as sent; unsigned fields
// are compared as sent and never wrap into a signed int.
//
// Ownership: free functions over values the caller owns. Thread-safety:
// pure functions, safe from any thread.
#ifndef PSA_COMPUTE_WORKER_SERVER_REQUEST_ADMISSION_H_
#define PSA_COMPUTE_WORKER_SERVER_REQUEST_ADMISSION_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "compute_worker/model/tokenizer.h"
#include "compute_worker/runtime/generator.h"
#include "proto/psa/v1/generation.pb.h"

namespace psa {

struct AdmissionLimits {
  int n_vocab = 0;
  int max_context = 0;                  // tokens: prompt plus max_tokens
  int default_max_tokens = 256;         // for max_tokens = 0
  uint64_t max_prompt_bytes = 4 << 20;  // a text, or a chat's contents together
  // Tokenizer::max_input_bytes_per_token(): a text of n bytes the
  // tokenizer keeps is at least ceil(n / this) tokens. 0: no bound (the
  // size check is skipped).
  int max_input_bytes_per_token = 0;
  // Counts the bytes Encode() keeps (Tokenizer::EncodableBytes); null: all.
  const Tokenizer* tokenizer = nullptr;
  bool adds_bos = false;  // Encode() prepends a BOS token
};

// Everything the request's sizes and numbers decide: the prompt is set;
// max_tokens fits the context; token ids (prompt and resume) are in the
// vocabulary; a text or chat is within max_prompt_bytes, and a text could
// fit the context by its size alone (CheckTextFits).
absl::Status AdmitGenerateRequest(const psa::v1::GenerateRequest& request,
                                  const AdmissionLimits& limits);

// Refuses a `text` (`field` names it in the message) that cannot fit the
// context with `max_tokens` whatever it says: it encodes to at least
// ceil(kept bytes / max_input_bytes_per_token) tokens, BOS aside. One pass
// over its bytes; no tokenizing.
absl::Status CheckTextFits(absl::string_view field, absl::string_view text, int max_tokens,
                           const AdmissionLimits& limits);

// max_tokens as served: the request's, or the default for 0. The request
// must have been admitted (its max_tokens fits an int).
int EffectiveMaxTokens(const psa::v1::GenerateRequest& request, const AdmissionLimits& limits);

// The prompt of an admitted token-id request.
std::vector<TokenId> PromptTokenIds(const psa::v1::GenerateRequest& request);

// The generation an admitted request asks for, on `prompt` (its prompt's
// tokens; the resumed tokens are appended). A top_k at or above the
// vocabulary size is no limit, as 0 is.
GenerationRequest ToGenerationRequest(const psa::v1::GenerateRequest& request,
                                      std::vector<TokenId> prompt,
                                      const AdmissionLimits& limits);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_REQUEST_ADMISSION_H_
