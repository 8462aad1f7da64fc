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

absl::StatusOr<GenerationResult> Generate(LlamaRuntime& runtime, const GenerationRequest& req,
                                          const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  if (auto s = req.sampling.Validate(); !s.ok()) return s;
  if (req.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (req.max_tokens < 0) return absl::InvalidArgumentError("max_tokens must be >= 0");
  for (const std::string& s : req.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  const int n_vocab = runtime.model().hparams().n_vocab;
  if (static_cast<int64_t>(req.prompt.size()) + req.max_tokens > runtime.max_context()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", req.prompt.size(), " tokens) plus max_tokens (", req.max_tokens,
        ") exceeds the context limit of ", runtime.max_context(), " tokens"));
  }
  const Tokenizer& tok = runtime.model().tokenizer();
  size_t hold = 0;  // bytes to hold back: a stop string may be forming
  for (const std::string& s : req.stop_strings) hold = std::max(hold, s.size() - 1);

  GenerationResult result;
  KvCache kv = runtime.NewCache();
  std::vector<float> logits;
  const auto t0 = Clock::now();
  if (auto s = runtime.Prefill(&kv, req.prompt, &logits); !s.ok()) return s;
  const auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  Sampler sampler(req.sampling);
  std::vector<HeadStepStats> stats;
  std::string pending;  // decoded but not yet released
  result.finish_reason = "length";
  for (int i = 0; i < req.max_tokens; ++i) {
    const TokenId next = sampler.Sample(logits.data(), n_vocab);
    result.tokens.push_back(next);
    const bool eog = !req.ignore_eos && tok.IsEndOfGeneration(next);
    if (!eog) pending += tok.TokenBytes(next);
    // Stop strings end the text where they begin.
    size_t stop_at = std::string::npos;
    for (const std::string& s : req.stop_strings) stop_at = std::min(stop_at, pending.find(s));
    const bool stopped = stop_at != std::string::npos;
    if (stopped) pending.resize(stop_at);
    const bool last = eog || stopped || i + 1 == req.max_tokens;
    size_t release = pending.size();
    if (!last) release -= std::min(release, std::max(hold, IncompleteUtf8Suffix(pending)));
    const std::string piece = pending.substr(0, release);
    pending.erase(0, release);
    result.text += piece;
    if (on_token && !on_token(next, piece)) {
      result.finish_reason = "cancelled";
      break;
    }
    if (eog || stopped) {
      result.finish_reason = eog ? "eos" : "stop";
      break;
    }
    if (i + 1 == req.max_tokens) break;
    BatchEntry step{&kv, {&next, 1}, true, req.attention, &stats};
    if (auto s = runtime.Forward({&step, 1}, &logits); !s.ok()) return s;
    for (const HeadStepStats& h : stats) {
      result.kv_blocks_touched += h.blocks_touched;
      result.kv_blocks_total += h.blocks_total;
    }
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace psa
