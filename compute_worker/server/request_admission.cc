#include "compute_worker/server/request_admission.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace psa {
namespace {

using psa::v1::GenerateRequest;

template <typename Ids>
absl::Status CheckIds(absl::string_view field, const Ids& ids, int n_vocab) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids.Get(i) >= static_cast<uint32_t>(n_vocab)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, "[", i, "] is ", ids.Get(i), ", outside the vocabulary [0, ", n_vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPromptBytes(absl::string_view field, uint64_t bytes,
                              const AdmissionLimits& limits) {
  if (bytes <= limits.max_prompt_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      field, " is ", bytes, " bytes; the worker takes at most ", limits.max_prompt_bytes,
      " (--max_request_bytes)"));
}

}  // namespace

absl::Status CheckTextFits(absl::string_view field, absl::string_view text, int max_tokens,
                           const AdmissionLimits& limits) {
  const uint64_t per_token = limits.max_input_bytes_per_token;
  if (per_token == 0) return absl::OkStatus();
  const uint64_t kept = limits.tokenizer == nullptr
                            ? text.size()
                            : limits.tokenizer->EncodableBytes({text.data(), text.size()});
  const uint64_t fewest = (kept + per_token - 1) / per_token + (limits.adds_bos ? 1 : 0);
  if (fewest + max_tokens <= static_cast<uint64_t>(limits.max_context)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      field, " is ", text.size(), " bytes",
      kept == text.size() ? "" : absl::StrCat(" (", kept, " the tokenizer keeps)"),
      ", so at least ", fewest, " tokens (one token of this model stands for at most ",
      per_token, " bytes); with max_tokens ", max_tokens, " it cannot fit the context limit of ",
      limits.max_context, " tokens: shorten the prompt or lower max_tokens"));
}

absl::Status AdmitGenerateRequest(const GenerateRequest& request, const AdmissionLimits& limits) {
  if (request.max_tokens() > static_cast<uint32_t>(limits.max_context)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens is ", request.max_tokens(), ", which exceeds the context limit of ",
        limits.max_context, " tokens (prompt included; 0 asks for the worker's default, ",
        limits.default_max_tokens, ")"));
  }
  if (absl::Status s = CheckIds("resume.token_ids", request.resume().token_ids(), limits.n_vocab);
      !s.ok()) {
    return s;
  }
  switch (request.prompt_case()) {
    case GenerateRequest::kTokenIds:
      return CheckIds("token_ids.ids", request.token_ids().ids(), limits.n_vocab);
    case GenerateRequest::kText: {
      if (absl::Status s = CheckPromptBytes("text", request.text().size(), limits); !s.ok()) {
        return s;
      }
      return CheckTextFits("text", request.text(), EffectiveMaxTokens(request, limits), limits);
    }
    case GenerateRequest::kChat: {
      if (request.chat().messages_size() == 0) {
        return absl::InvalidArgumentError("chat has no messages");
      }
      uint64_t bytes = 0;
      for (const auto& m : request.chat().messages()) bytes += m.content().size();
      // The template may trim contents: the size check waits for its output.
      return CheckPromptBytes("chat (its messages' contents together)", bytes, limits);
    }
    default:
      return absl::InvalidArgumentError("the request has no prompt: set text, chat or token_ids");
  }
}

int EffectiveMaxTokens(const GenerateRequest& request, const AdmissionLimits& limits) {
  return request.max_tokens() == 0 ? limits.default_max_tokens
                                   : static_cast<int>(request.max_tokens());
}

std::vector<TokenId> PromptTokenIds(const GenerateRequest& request) {
  std::vector<TokenId> ids;
  ids.reserve(request.token_ids().ids_size());
  for (uint32_t id : request.token_ids().ids()) ids.push_back(static_cast<TokenId>(id));
  return ids;
}

GenerationRequest ToGenerationRequest(const GenerateRequest& request,
                                      std::vector<TokenId> prompt,
                                      const AdmissionLimits& limits) {
  const psa::v1::SamplingParams& s = request.sampling();
  GenerationRequest gen;
  gen.prompt = std::move(prompt);
  gen.sampling.temperature = s.temperature();
  // top_k >= the vocabulary keeps every token: no limit, as 0.
  gen.sampling.top_k =
      s.top_k() >= static_cast<uint32_t>(limits.n_vocab) ? 0 : static_cast<int>(s.top_k());
  gen.sampling.top_p = s.top_p() == 0 ? 1.0f : s.top_p();
  gen.sampling.seed = s.seed();
  // 0 (unset): no repetition penalty, i.e. 1. Range checks: Validate().
  gen.sampling.repetition_penalty = s.repetition_penalty() == 0 ? 1.0f : s.repetition_penalty();
  gen.sampling.frequency_penalty = s.frequency_penalty();
  gen.sampling.presence_penalty = s.presence_penalty();
  gen.max_tokens = EffectiveMaxTokens(request, limits);
  gen.stop_strings.assign(request.stop().begin(), request.stop().end());
  gen.cache_salt = request.cache_salt();
  gen.ignore_eos = request.ignore_eos();
  if (request.has_resume()) {
    for (uint32_t id : request.resume().token_ids()) {
      gen.prompt.push_back(static_cast<TokenId>(id));
    }
    gen.resumed = request.resume().token_ids_size();
    gen.resumed_text_bytes = request.resume().text_bytes();
  }
  return gen;
}

}  // namespace psa
