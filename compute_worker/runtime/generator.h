// Single-sequence generation loop: prefill, then sample and decode until an
// end-of-generation token, a stop string or max_tokens. Streams text pieces
// that are always whole UTF-8 and never part of a stop string.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_GENERATOR_H_
#define PSA_COMPUTE_WORKER_RUNTIME_GENERATOR_H_

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "compute_worker/runtime/sampler.h"

namespace psa {

struct GenerationRequest {
  std::vector<TokenId> prompt;
  SamplingParams sampling;
  int max_tokens = 128;
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;  // keep going past end-of-generation tokens
  // Attention for the decode steps (null: the runtime's default backend).
  const AttentionBackend* attention = nullptr;
  // Resuming a generation another worker started: the last `resumed`
  // tokens of `prompt` were already generated (they count toward
  // max_tokens, stop strings and end of generation), and the client already
  // has `resumed_text_bytes` bytes of their text.
  int resumed = 0;
  size_t resumed_text_bytes = 0;
  // Scope of prefix reuse through the KV service (the tenant): blocks are
  // shared only between requests with equal salts.
  std::string cache_salt;
};

struct GenerationResult {
  std::vector<TokenId> tokens;  // generated ids (stop strings' tokens included)
  std::string text;             // generated text, cut before any stop string
  std::string finish_reason;    // "eos", "stop" or "length"
  double prefill_seconds = 0;
  double decode_seconds = 0;    // from the first token to the last
  // KV blocks attended over all decode steps, layers and query heads, and
  // the blocks dense attention would have read: their ratio is the KV
  // fraction the attention policy touched.
  int64_t kv_blocks_touched = 0;
  int64_t kv_blocks_total = 0;
};

// Called with each new token and the text it releases (possibly empty);
// returning false cancels the generation (finish_reason "cancelled").
using TokenCallback = std::function<bool(TokenId token, std::string_view text)>;

// Fills the empty `kv` with `prompt`, whose last `resumed` tokens were
// generated (GenerationRequest::resumed): the rest as one prefill, those as
// the decode steps that made them (one row each, through `attention`), so
// that a sparse policy attends their rows as it did — a prompt row is
// always attended densely. *logits: the last row's.
absl::Status PrefillResumable(LlamaRuntime& runtime, KvCache* kv, absl::Span<const TokenId> prompt,
                              int resumed, const AttentionBackend* attention,
                              std::vector<float>* logits);

absl::StatusOr<GenerationResult> Generate(LlamaRuntime& runtime, const GenerationRequest& request,
                                          const TokenCallback& on_token = nullptr);

// INVALID_ARGUMENT saying what to fix: empty prompt, unknown token ids,
// negative max_tokens, empty stop strings, bad sampling, or prompt plus
// max_tokens past `max_context`.
absl::Status ValidateGenerationRequest(const GenerationRequest& request, int n_vocab,
                                       int max_context);

// One sequence's token-to-text bookkeeping: end-of-generation tokens, stop
// strings (text is cut where one begins and held back while one may be
// forming), whole UTF-8 pieces, max_tokens. Shared by Generate() and the
// worker's batch scheduler.
class GenerationState {
 public:
  GenerationState(const Tokenizer& tokenizer, const GenerationRequest& request);

  struct Step {
    std::string text;      // released by this token (possibly empty)
    bool finished = false;
  };
  // Takes the next sampled token.
  Step Accept(TokenId token);
  // Text owed to the client after resuming (see GenerationRequest::resumed):
  // released by the resumed tokens but not yet sent. Empty afterwards.
  std::string TakeResumedText();
  // Ends the generation early (finish_reason "cancelled").
  void Cancel() { finish_reason_ = "cancelled"; }

  const std::vector<TokenId>& tokens() const { return tokens_; }
  const std::string& text() const { return text_; }
  // "eos", "stop", "length", "cancelled"; empty while running.
  const std::string& finish_reason() const { return finish_reason_; }

 private:
  const Tokenizer& tokenizer_;
  const GenerationRequest& request_;
  size_t hold_ = 0;       // bytes to hold back: a stop string may be forming
  std::string pending_;   // decoded but not yet released
  std::vector<TokenId> tokens_;
  std::string text_;
  std::string finish_reason_;
  std::string resumed_text_;  // owed to the client
  size_t skip_bytes_ = 0;     // already sent beyond what resuming released
};

// Bytes at the end of s that form an incomplete UTF-8 sequence (0..3).
size_t IncompleteUtf8Suffix(std::string_view s);

// s with every byte that is not part of a well-formed UTF-8 sequence
// replaced by U+FFFD (a model can emit arbitrary bytes; APIs carry text).
std::string ValidUtf8(std::string_view s);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_GENERATOR_H_
