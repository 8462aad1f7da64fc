// Sampler penalties on hand-made logits: repetition (vLLM), frequency and
// presence (OpenAI) change the choice exactly as their formulas say, count
// what the sampler itself picks, continue across a resume, and are
// validated. Without them the sampler is what it always was.
#include "compute_worker/runtime/sampler.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

using ::testing::HasSubstr;

SamplingParams Penalties(float repetition, float frequency, float presence) {
  SamplingParams p;
  p.repetition_penalty = repetition;
  p.frequency_penalty = frequency;
  p.presence_penalty = presence;
  return p;
}

std::vector<float> Applied(const SamplingParams& p, const std::vector<TokenId>& context,
                           int tokens_done, std::vector<float> logits) {
  Sampler(p, context, tokens_done).ApplyPenalties(logits.data(), logits.size());
  return logits;
}

TEST(SamplerPenaltyTest, RepetitionDividesPositiveAndMultipliesNegativeLogits) {
  // Token 0 and 1 in the prompt, 3 generated; 2 and 4 never seen.
  const std::vector<TokenId> context = {0, 1, 3};
  const std::vector<float> logits = {2.0f, -1.0f, 1.0f, 0.5f, 3.0f};
  const auto got = Applied(Penalties(2.0f, 0, 0), context, 1, logits);
  EXPECT_EQ(got, (std::vector<float>{1.0f, -2.0f, 1.0f, 0.25f, 3.0f}));
  // Below 1 it rewards repeating, the other way round.
  const auto reward = Applied(Penalties(0.5f, 0, 0), context, 1, logits);
  EXPECT_EQ(reward, (std::vector<float>{4.0f, -0.5f, 1.0f, 1.0f, 3.0f}));
  // A zero logit stays zero.
  EXPECT_EQ(Applied(Penalties(2.0f, 0, 0), {0}, 0, {0.0f, 1.0f})[0], 0.0f);
}

TEST(SamplerPenaltyTest, RepetitionChangesTheArgmaxWhereTheFormulaSays) {
  const std::vector<float> logits = {2.0f, 1.5f, -3.0f};
  const std::vector<TokenId> prompt = {0, 2};
  // 2 / 1.3 = 1.538 > 1.5: still token 0. 2 / 1.4 = 1.429 < 1.5: token 1.
  EXPECT_EQ(Sampler(Penalties(1.3f, 0, 0), prompt).Sample(logits.data(), 3), 0);
  EXPECT_EQ(Sampler(Penalties(1.4f, 0, 0), prompt).Sample(logits.data(), 3), 1);
  // Unpenalized, or without the history, token 0.
  EXPECT_EQ(Sampler(SamplingParams{}, prompt).Sample(logits.data(), 3), 0);
  EXPECT_EQ(Sampler(Penalties(1.4f, 0, 0)).Sample(logits.data(), 3), 0);
}

// Prompt {4}, then generated 0, 0, 2 (a resumed generation's layout).
const std::vector<TokenId> kContext = {4, 0, 0, 2};
constexpr int kDone = 3;
const std::vector<float> kLogits = {3.0f, 2.2f, 2.6f, 0.0f, 1.0f};

TEST(SamplerPenaltyTest, FrequencyCountsGeneratedTokensOnly) {
  // 0: 3 - 2 * 0.5 = 2.0, 2: 2.6 - 0.5 = 2.1; 4 is only in the prompt.
  EXPECT_EQ(Applied(Penalties(1, 0.5f, 0), kContext, kDone, kLogits),
            (std::vector<float>{3.0f - 2 * 0.5f, 2.2f, 2.6f - 0.5f, 0.0f, 1.0f}));
  EXPECT_EQ(Sampler(Penalties(1, 0.5f, 0), kContext, kDone).Sample(kLogits.data(), 5), 1);
  // 0.3: 3 - 0.6 = 2.4 > 2.3 > 2.2: token 0 still.
  EXPECT_EQ(Sampler(Penalties(1, 0.3f, 0), kContext, kDone).Sample(kLogits.data(), 5), 0);
  // The same tokens as prompt (nothing generated): no frequency penalty.
  EXPECT_EQ(Sampler(Penalties(1, 2.0f, 0), kContext, 0).Sample(kLogits.data(), 5), 0);
}

TEST(SamplerPenaltyTest, PresenceIsOncePerGeneratedToken) {
  // 0.5: 0 -> 2.5, 2 -> 2.1: token 0. 0.9: 0 -> 2.1 < 2.2: token 1.
  EXPECT_EQ(Applied(Penalties(1, 0, 0.5f), kContext, kDone, kLogits),
            (std::vector<float>{3.0f - 0.5f, 2.2f, 2.6f - 0.5f, 0.0f, 1.0f}));
  EXPECT_EQ(Sampler(Penalties(1, 0, 0.5f), kContext, kDone).Sample(kLogits.data(), 5), 0);
  EXPECT_EQ(Sampler(Penalties(1, 0, 0.9f), kContext, kDone).Sample(kLogits.data(), 5), 1);
  // Negative: rewards what was generated (token 2: 2.6 + 0.5 > 3.0).
  EXPECT_EQ(Sampler(Penalties(1, 0, -0.5f), {4, 2}, 1).Sample(kLogits.data(), 5), 2);
}

TEST(SamplerPenaltyTest, AllThreeApplyInVllmOrder) {
  // Repetition first, then frequency per count, then presence.
  const auto got = Applied(Penalties(1.5f, 0.3f, 0.2f), kContext, kDone, kLogits);
  EXPECT_FLOAT_EQ(got[0], 3.0f / 1.5f - 0.3f * 2 - 0.2f);
  EXPECT_FLOAT_EQ(got[1], 2.2f);
  EXPECT_FLOAT_EQ(got[2], 2.6f / 1.5f - 0.3f - 0.2f);
  EXPECT_FLOAT_EQ(got[3], 0.0f);
  EXPECT_FLOAT_EQ(got[4], 1.0f / 1.5f);  // prompt: repetition only
}

TEST(SamplerPenaltyTest, SampledTokensCountFromThenOn) {
  const std::vector<float> flat = {1.0f, 0.9f, 0.8f};
  Sampler presence(Penalties(1, 0, 1.0f));
  std::vector<TokenId> got;
  for (int i = 0; i < 4; ++i) got.push_back(presence.Sample(flat.data(), 3));
  // Each is pushed below the next until all are: {0, -0.1, -0.2}.
  EXPECT_EQ(got, (std::vector<TokenId>{0, 1, 2, 0}));
  Sampler unpenalized(SamplingParams{});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(unpenalized.Sample(flat.data(), 3), 0);
}

// A deterministic stand-in for a model: the next logits depend on the last
// token only, and greedy decoding without penalties falls into a loop.
class FakeModel {
 public:
  static constexpr int kVocab = 40;
  FakeModel() {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    table_.resize(kVocab * kVocab);
    for (float& x : table_) x = 2.0f * normal(rng);
  }
  const float* Logits(TokenId last) const { return &table_[last * kVocab]; }

  // `n` tokens after `context` (whose last `done` tokens were generated).
  std::vector<TokenId> Run(const SamplingParams& p, std::vector<TokenId> context, int done,
                           int n) const {
    Sampler sampler(p, context, done);
    std::vector<TokenId> out;
    for (int i = 0; i < n; ++i) {
      out.push_back(sampler.Sample(Logits(context.back()), kVocab));
      context.push_back(out.back());
    }
    return out;
  }

 private:
  std::vector<float> table_;
};

int Distinct(const std::vector<TokenId>& tokens) {
  std::vector<bool> seen(FakeModel::kVocab);
  int n = 0;
  for (TokenId t : tokens) n += !seen[t], seen[t] = true;
  return n;
}

TEST(SamplerPenaltyTest, AResumedSamplerContinuesLikeTheUninterruptedOne) {
  const FakeModel model;
  const std::vector<TokenId> prompt = {3, 17, 5, 11};
  constexpr int kTokens = 40;
  SamplingParams sampled = Penalties(1.2f, 0.4f, 0.3f);
  sampled.temperature = 0.8f;
  sampled.top_k = 10;
  sampled.top_p = 0.9f;
  sampled.seed = 11;
  for (const SamplingParams& p : {Penalties(1.2f, 0.4f, 0.3f), Penalties(1.3f, 0, 0),
                                  Penalties(1, 0.5f, 0), Penalties(1, 0, -0.4f), sampled}) {
    const std::vector<TokenId> whole = model.Run(p, prompt, 0, kTokens);
    for (int k : {1, 7, 23}) {
      std::vector<TokenId> context = prompt;
      context.insert(context.end(), whole.begin(), whole.begin() + k);
      EXPECT_EQ(model.Run(p, context, k, kTokens - k),
                std::vector<TokenId>(whole.begin() + k, whole.end()))
          << "resumed after " << k << " tokens, repetition " << p.repetition_penalty
          << " frequency " << p.frequency_penalty << " presence " << p.presence_penalty
          << " temperature " << p.temperature;
    }
  }
}

TEST(SamplerPenaltyTest, PenaltiesBreakAGreedyLoop) {
  const FakeModel model;
  const std::vector<TokenId> prompt = {3, 17, 5, 11};
  const std::vector<TokenId> plain = model.Run(SamplingParams{}, prompt, 0, 40);
  const std::vector<TokenId> penalized = model.Run(Penalties(1, 0.5f, 0.5f), prompt, 0, 40);
  EXPECT_NE(plain, penalized);
  EXPECT_GT(Distinct(penalized), Distinct(plain));
}

TEST(SamplerPenaltyTest, NeutralValuesLeaveSamplingAsItWas) {
  const FakeModel model;
  const std::vector<TokenId> prompt = {3, 17, 5, 11};
  SamplingParams p;
  p.temperature = 0.9f;
  p.seed = 5;
  SamplingParams neutral = p;
  neutral.repetition_penalty = 1.0f;
  neutral.frequency_penalty = 0.0f;
  neutral.presence_penalty = -0.0f;
  EXPECT_FALSE(neutral.penalized());
  // Given the history or not: the same stream as without penalty fields.
  for (int done : {0, 2}) {
    Sampler before(p, prompt, done), neutral_with_history(neutral, prompt, done);
    std::vector<TokenId> context = prompt;
    for (int i = 0; i < 30; ++i) {
      const float* logits = model.Logits(context.back());
      const TokenId a = neutral_with_history.Sample(logits, FakeModel::kVocab);
      EXPECT_EQ(a, before.Sample(logits, FakeModel::kVocab)) << i;
      context.push_back(a);
    }
  }
  // Greedy: the plain argmax.
  EXPECT_EQ(Sampler(SamplingParams{}, prompt, 4).Sample(kLogits.data(), 5),
            ArgMax(kLogits.data(), 5));
}

TEST(SamplerPenaltyTest, ValidationNamesTheField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float bad : {0.0f, -1.0f, nan, inf}) {
    absl::Status s = Penalties(bad, 0, 0).Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.message(), HasSubstr("repetition_penalty")) << bad;
  }
  for (float bad : {2.01f, -2.5f, nan, inf, -inf}) {
    absl::Status f = Penalties(1, bad, 0).Validate();
    EXPECT_EQ(f.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(f.message(), HasSubstr("frequency_penalty")) << bad;
    absl::Status p = Penalties(1, 0, bad).Validate();
    EXPECT_EQ(p.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(p.message(), HasSubstr("presence_penalty")) << bad;
  }
  EXPECT_TRUE(Penalties(1e-3f, -2.0f, 2.0f).Validate().ok());
  EXPECT_TRUE(Penalties(5.0f, 2.0f, -2.0f).Validate().ok());
  EXPECT_TRUE(SamplingParams{}.Validate().ok());
}

}  // namespace
}  // namespace psa
