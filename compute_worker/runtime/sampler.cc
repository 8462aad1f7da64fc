#include "compute_worker/runtime/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace psa {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repetition_penalty must be > 0 and finite (1: off), got ", repetition_penalty));
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("frequency_penalty must be in [-2, 2], got ", frequency_penalty));
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("presence_penalty must be in [-2, 2], got ", presence_penalty));
  }
  return absl::OkStatus();
}

// Sampling a token takes one draw of this distribution (greedy takes none).
using Uniform = std::uniform_real_distribution<double>;

Sampler::Sampler(const SamplingParams& params, absl::Span<const TokenId> context,
                 int tokens_done)
    : params_(params), rng_(params.seed) {
  tokens_done = std::clamp<int>(tokens_done, 0, context.size());
  if (params_.penalized()) {
    const size_t prompt = context.size() - tokens_done;
    if (params_.repetition_penalty != 1.0f) {
      for (size_t i = 0; i < prompt; ++i) seen_[context[i]].in_prompt = true;
    }
    for (size_t i = prompt; i < context.size(); ++i) ++seen_[context[i]].generated;
  }
  if (greedy()) return;
  for (int i = 0; i < tokens_done; ++i) Uniform(0.0, 1.0)(rng_);
}

void Sampler::ApplyPenalties(float* logits, int n_vocab) const {
  const float rep = params_.repetition_penalty;
  const float freq = params_.frequency_penalty;
  const float presence = params_.presence_penalty;
  for (const auto& [token, seen] : seen_) {
    if (token < 0 || token >= n_vocab) continue;
    float& l = logits[token];
    if (rep != 1.0f && (seen.in_prompt || seen.generated > 0)) l = l > 0.0f ? l / rep : l * rep;
    if (seen.generated > 0) {
      l -= freq * static_cast<float>(seen.generated);
      l -= presence;
    }
  }
}

TokenId ArgMax(const float* logits, int n) {
  return static_cast<TokenId>(std::max_element(logits, logits + n) - logits);
}

TokenId Sampler::Sample(const float* logits, int n_vocab) {
  if (!params_.penalized()) return Pick(logits, n_vocab);
  penalized_.assign(logits, logits + n_vocab);
  ApplyPenalties(penalized_.data(), n_vocab);
  const TokenId token = Pick(penalized_.data(), n_vocab);
  ++seen_[token].generated;
  return token;
}

TokenId Sampler::Pick(const float* logits, int n_vocab) {
  if (greedy()) return ArgMax(logits, n_vocab);
  candidates_.resize(n_vocab);
  for (int i = 0; i < n_vocab; ++i) candidates_[i] = {logits[i], i};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t n = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
    n = params_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + n, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  // Softmax with temperature over the kept candidates (sorted, max first).
  const float max = candidates_[0].first;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    candidates_[i].first = std::exp((candidates_[i].first - max) / params_.temperature);
    sum += candidates_[i].first;
  }
  // Nucleus: the smallest prefix whose probability reaches top_p.
  if (params_.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < n; ++i) {
      acc += candidates_[i].first / sum;
      if (acc >= params_.top_p) {
        n = i + 1;
        break;
      }
    }
    sum = 0;
    for (size_t i = 0; i < n; ++i) sum += candidates_[i].first;
  }
  Uniform uniform(0.0, sum);
  double r = uniform(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= candidates_[i].first;
    if (r <= 0) return candidates_[i].second;
  }
  return candidates_[n - 1].second;
}

}  // namespace psa
