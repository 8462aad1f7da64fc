#include "compute_worker/runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace psa {

size_t IncompleteUtf8Suffix(std::string_view s) {
  // Look back at most 3 bytes for a lead byte whose sequence is unfinished.
  for (size_t back = 1; back <= std::min<size_t>(3, s.size()); ++back) {
    const unsigned char c = s[s.size() - back];
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) need = 2;
    else if ((c & 0xF0) == 0xE0) need = 3;
    else if ((c & 0xF8) == 0xF0) need = 4;
    return need > back ? back : 0;
  }
  return 0;
}

std::string ValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
                 : (c & 0xF8) == 0xF0 ? 4 : 0;
    bool ok = len > 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok && len > 1) {  // no overlong forms, surrogates or code points past U+10FFFF
      uint32_t cp = c & (0xFF >> (len + 1));
      for (size_t k = 1; k < len; ++k) cp = cp << 6 | (s[i + k] & 0x3F);
      static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
      ok = cp >= kMin[len] && cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF);
    }
    if (ok) {
      out.append(s.data() + i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      ++i;
    }
  }
  return out;
}

absl::Status ValidateGenerationRequest(const GenerationRequest& req, int n_vocab,
                                       int max_context) {
  if (auto s = req.sampling.Validate(); !s.ok()) return s;
  if (req.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (TokenId t : req.prompt) {
    if (t < 0 || t >= n_vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", t, " is outside the vocabulary [0, ", n_vocab, ")"));
    }
  }
  if (req.max_tokens < 0) return absl::InvalidArgumentError("max_tokens must be >= 0");
  for (const std::string& s : req.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  if (req.resumed < 0 || req.resumed > static_cast<int>(req.prompt.size()) - 1 ||
      req.resumed > req.max_tokens) {
    return absl::InvalidArgumentError(
        "resumed tokens must leave a prompt token and not exceed max_tokens");
  }
  if (static_cast<int64_t>(req.prompt.size()) - req.resumed + req.max_tokens > max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", req.prompt.size(), " tokens) plus max_tokens (", req.max_tokens,
        ") exceeds the context limit of ", max_context, " tokens"));
  }
  return absl::OkStatus();
}

GenerationState::GenerationState(const Tokenizer& tokenizer, const GenerationRequest& request)
    : tokenizer_(tokenizer), request_(request) {
  for (const std::string& s : request.stop_strings) hold_ = std::max(hold_, s.size() - 1);
  if (request.max_tokens == 0) finish_reason_ = "length";
  // Replay the resumed tokens through the same rules the first worker ran.
  const size_t first = request.prompt.size() - request.resumed;
  std::string released;
  for (size_t i = first; i < request.prompt.size() && finish_reason_.empty(); ++i) {
    released += Accept(request.prompt[i]).text;
  }
  if (released.size() > request.resumed_text_bytes) {
    resumed_text_ = released.substr(request.resumed_text_bytes);
  } else {
    skip_bytes_ = request.resumed_text_bytes - released.size();
  }
}

std::string GenerationState::TakeResumedText() { return std::move(resumed_text_); }

GenerationState::Step GenerationState::Accept(TokenId token) {
  Step step;
  tokens_.push_back(token);
  const bool eog = !request_.ignore_eos && tokenizer_.IsEndOfGeneration(token);
  if (!eog) pending_ += tokenizer_.TokenBytes(token);
  // Stop strings end the text where they begin.
  size_t stop_at = std::string::npos;
  for (const std::string& s : request_.stop_strings) stop_at = std::min(stop_at, pending_.find(s));
  const bool stopped = stop_at != std::string::npos;
  if (stopped) pending_.resize(stop_at);
  const bool at_limit = static_cast<int>(tokens_.size()) >= request_.max_tokens;
  step.finished = eog || stopped || at_limit;
  size_t release = pending_.size();
  if (!step.finished) release -= std::min(release, std::max(hold_, IncompleteUtf8Suffix(pending_)));
  step.text = pending_.substr(0, release);
  pending_.erase(0, release);
  text_ += step.text;
  if (skip_bytes_ > 0) {  // the client has these already
    const size_t skip = std::min(skip_bytes_, step.text.size());
    step.text.erase(0, skip);
    skip_bytes_ -= skip;
  }
  if (step.finished) finish_reason_ = eog ? "eos" : stopped ? "stop" : "length";
  return step;
}

absl::Status PrefillResumable(LlamaRuntime& runtime, KvCache* kv, absl::Span<const TokenId> prompt,
                              int resumed, const AttentionBackend* attention,
                              std::vector<float>* logits) {
  const size_t decode_from = prompt.size() - resumed;
  if (auto s = runtime.Prefill(kv, prompt.subspan(0, decode_from), logits); !s.ok()) return s;
  for (size_t i = decode_from; i < prompt.size(); ++i) {
    BatchEntry entry{kv, prompt.subspan(i, 1), true, attention, nullptr};
    if (auto s = runtime.Forward({&entry, 1}, logits); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerationResult> Generate(LlamaRuntime& runtime, const GenerationRequest& req,
                                          const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  const int n_vocab = runtime.model().hparams().n_vocab;
  if (auto s = ValidateGenerationRequest(req, n_vocab, runtime.max_context()); !s.ok()) {
    return s;
  }
  GenerationResult result;
  KvCache kv = runtime.NewCache();
  std::vector<float> logits;
  const auto t0 = Clock::now();
  if (auto s = PrefillResumable(runtime, &kv, req.prompt, req.resumed, req.attention, &logits);
      !s.ok()) {
    return s;
  }
  const auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  GenerationState state(runtime.model().tokenizer(), req);
  Sampler sampler(req.sampling, req.prompt, req.resumed);
  std::vector<HeadStepStats> stats;
  while (state.finish_reason().empty()) {
    const TokenId next = sampler.Sample(logits.data(), n_vocab);
    const GenerationState::Step step = state.Accept(next);
    if (on_token && !on_token(next, step.text)) {
      state.Cancel();
      break;
    }
    if (step.finished) break;
    BatchEntry entry{&kv, {&next, 1}, true, req.attention, &stats};
    if (auto s = runtime.Forward({&entry, 1}, &logits); !s.ok()) return s;
    for (const HeadStepStats& h : stats) {
      result.kv_blocks_touched += h.blocks_touched;
      result.kv_blocks_total += h.blocks_total;
    }
  }
  result.tokens = state.tokens();
  result.text = state.text();
  result.finish_reason = state.finish_reason();
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace psa
