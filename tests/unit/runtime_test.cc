// Forward pass on tiny generated models: agreement with a naive reference
// implementation, batch/chunk invariance, and input validation.
#include "compute_worker/runtime/llama_runtime.h"

#include <cmath>
#include <random>

#include "compute_worker/runtime/generator.h"
#include "compute_worker/runtime/sampler.h"
#include "gtest/gtest.h"
#include "tests/unit/reference_forward.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

TEST(RuntimeTest, MatchesReferenceWithFloatWeights) {
  testing::TinyModelSpec spec;
  spec.weight_type = GgmlType::kF32;
  spec.embd_type = GgmlType::kF32;
  spec.seed = 11;
  auto model = TinyModel(spec);
  ASSERT_NE(model, nullptr);
  const ReferenceComparison c =
      CompareWithReference(*model, RandomTokens(40, model->hparams().n_vocab, 3));
  ASSERT_TRUE(c.ok);
  // Only the fp16 KV cache, query and probabilities differ from the reference.
  EXPECT_LT(c.max_err, 2e-3 * std::max(1.0, c.max_ref)) << "max_ref " << c.max_ref;
}

TEST(RuntimeTest, QuantizedWeightsStayCloseToReference) {
  for (GgmlType t : {GgmlType::kQ4_1, GgmlType::kQ4_0, GgmlType::kQ8_0, GgmlType::kF16,
                     GgmlType::kBF16}) {
    testing::TinyModelSpec spec;
    spec.weight_type = t;
    spec.tied_output = false;
    spec.seed = 20 + static_cast<int>(t);
    auto model = TinyModel(spec);
    ASSERT_NE(model, nullptr);
    LlamaRuntime rt(*model, RuntimeOptions{});
    const auto tokens = RandomTokens(24, model->hparams().n_vocab, 5);
    KvCache kv = rt.NewCache();
    std::vector<float> logits;
    ASSERT_TRUE(rt.Prefill(&kv, tokens, &logits).ok());
    const auto ref = ReferenceForward(*model, tokens);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (logits[i] - ref[i]) * (logits[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    // Activation quantisation (Q8) is the only approximation beyond fp16.
    EXPECT_LT(std::sqrt(num / den), 0.03) << TypeName(t);
  }
}

TEST(RuntimeTest, ChunkedPrefillAndStepwiseDecodeGiveIdenticalLogits) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  const auto tokens = RandomTokens(37, model->hparams().n_vocab, 9);
  LlamaRuntime whole(*model, RuntimeOptions{});
  KvCache kv1 = whole.NewCache();
  std::vector<float> a, b, c;
  ASSERT_TRUE(whole.Prefill(&kv1, tokens, &a).ok());

  RuntimeOptions small;
  small.max_batch_tokens = 5;
  LlamaRuntime chunked(*model, small);
  KvCache kv2 = chunked.NewCache();
  ASSERT_TRUE(chunked.Prefill(&kv2, tokens, &b).ok());
  // Attention gives every query row the same arithmetic however rows are
  // grouped, so chunking changes nothing, bit for bit (a prompt whose prefix
  // was loaded from the KV service continues exactly).
  EXPECT_EQ(a, b);

  KvCache kv3 = whole.NewCache();
  for (TokenId t : tokens) ASSERT_TRUE(whole.Prefill(&kv3, {&t, 1}, &c).ok());
  EXPECT_EQ(a, c);
  EXPECT_EQ(kv3.length(), 37);

  // Head dim 64 (the AVX-512 kernels where built with them), a prefix split
  // as a KV service load splits it: 48 tokens, then the last 4 as one chunk.
  testing::TinyModelSpec wide;
  wide.n_embd = 256;  // 4 heads of 64
  wide.n_ff = 256;
  wide.seed = 7;  // its own file: models are mapped, not copied
  auto model64 = TinyModel(wide);
  ASSERT_NE(model64, nullptr);
  LlamaRuntime rt64(*model64, RuntimeOptions{});
  const auto prompt = RandomTokens(52, model64->hparams().n_vocab, 10);
  std::vector<float> x, y;
  KvCache one = rt64.NewCache(), split = rt64.NewCache();
  ASSERT_TRUE(rt64.Prefill(&one, prompt, &x).ok());
  ASSERT_TRUE(rt64.Prefill(&split, {prompt.data(), 48}, &y).ok());
  ASSERT_TRUE(rt64.Prefill(&split, {prompt.data() + 48, 4}, &y).ok());
  EXPECT_EQ(x, y);

  // The same chunking twice is bit-exact.
  KvCache kv4 = chunked.NewCache();
  ASSERT_TRUE(chunked.Prefill(&kv4, tokens, &c).ok());
  EXPECT_EQ(b, c);
}

TEST(RuntimeTest, BatchedDecodeOfMixedLengthsEqualsOneByOne) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  const int V = model->hparams().n_vocab;
  LlamaRuntime rt(*model, RuntimeOptions{});
  const std::vector<int> lengths = {1, 5, 17, 33};
  std::vector<KvCache> solo, batched;
  std::vector<std::vector<float>> solo_logits(lengths.size());
  std::vector<float> tmp;
  std::vector<TokenId> next;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto p = RandomTokens(lengths[i], V, 100 + i);
    solo.push_back(rt.NewCache());
    batched.push_back(rt.NewCache());
    ASSERT_TRUE(rt.Prefill(&solo[i], p, &tmp).ok());
    ASSERT_TRUE(rt.Prefill(&batched[i], p, &tmp).ok());
    next.push_back(static_cast<TokenId>((7 * i + 3) % V));
    ASSERT_TRUE(rt.Prefill(&solo[i], {&next[i], 1}, &solo_logits[i]).ok());
  }
  // One pass mixing decode tokens with a prompt chunk of a new sequence.
  KvCache fresh = rt.NewCache();
  const auto fresh_prompt = RandomTokens(9, V, 77);
  std::vector<BatchEntry> batch;
  for (size_t i = 0; i < lengths.size(); ++i) batch.push_back({&batched[i], {&next[i], 1}, true});
  batch.push_back({&fresh, fresh_prompt, true});
  std::vector<float> logits;
  ASSERT_TRUE(rt.Forward(batch, &logits).ok());
  ASSERT_EQ(logits.size(), (lengths.size() + 1) * V);
  for (size_t i = 0; i < lengths.size(); ++i) {
    std::vector<float> row(logits.begin() + i * V, logits.begin() + (i + 1) * V);
    EXPECT_EQ(row, solo_logits[i]) << "sequence " << i;
    EXPECT_EQ(batched[i].length(), lengths[i] + 1);
  }
  KvCache fresh_solo = rt.NewCache();
  ASSERT_TRUE(rt.Prefill(&fresh_solo, fresh_prompt, &tmp).ok());
  EXPECT_EQ(std::vector<float>(logits.end() - V, logits.end()), tmp);
}

TEST(RuntimeTest, BadInputsAreRejectedAndLeaveCachesUnchanged) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  RuntimeOptions opts;
  opts.max_context = 16;
  LlamaRuntime rt(*model, opts);
  KvCache kv = rt.NewCache();
  std::vector<float> logits;
  const std::vector<TokenId> ok = {1, 2, 3};
  ASSERT_TRUE(rt.Prefill(&kv, ok, &logits).ok());

  const std::vector<TokenId> bad_id = {1, model->hparams().n_vocab};
  auto s = rt.Prefill(&kv, bad_id, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), absl::string_view::npos);
  EXPECT_EQ(kv.length(), 3);

  const std::vector<TokenId> too_long(14, 1);
  s = rt.Prefill(&kv, too_long, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("limit of 16"), absl::string_view::npos);
  EXPECT_EQ(kv.length(), 3);

  EXPECT_EQ(rt.Prefill(&kv, {}, &logits).code(), absl::StatusCode::kInvalidArgument);
  std::vector<BatchEntry> twice = {{&kv, ok, true}, {&kv, ok, true}};
  EXPECT_EQ(rt.Forward(twice, &logits).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.length(), 3);
}

// A 3-token prompt continued for max_tokens, end-of-generation ignored.
GenerationRequest ContinueFor(int max_tokens) {
  GenerationRequest req;
  req.prompt = {5, 6, 7};
  req.max_tokens = max_tokens;
  req.ignore_eos = true;
  return req;
}

TEST(GeneratorTest, GreedyStopsAtMaxTokensAndIsDeterministic) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  LlamaRuntime rt(*model, RuntimeOptions{});
  const GenerationRequest req = ContinueFor(12);
  auto a = Generate(rt, req);
  auto b = Generate(rt, req);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens.size(), 12u);
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_EQ(a->finish_reason, "length");
  EXPECT_EQ(a->text, model->tokenizer().Decode(a->tokens));
}

TEST(GeneratorTest, ASampledGenerationResumedAfterNTokensContinuesTheSameStream) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  LlamaRuntime rt(*model, RuntimeOptions{});
  GenerationRequest req = ContinueFor(30);
  req.sampling.temperature = 1.5f;  // flat enough that the stream decides
  req.sampling.seed = 11;
  auto whole = Generate(rt, req);
  ASSERT_TRUE(whole.ok());
  for (int done : {1, 12}) {
    GenerationRequest resumed = req;
    resumed.prompt.insert(resumed.prompt.end(), whole->tokens.begin(),
                          whole->tokens.begin() + done);
    resumed.resumed = done;
    auto rest = Generate(rt, resumed);
    ASSERT_TRUE(rest.ok());
    // The result counts the resumed tokens as generated (they come first).
    EXPECT_EQ(rest->tokens, whole->tokens) << "resumed after " << done;
  }
  // Another seed samples another stream (so the equality above is not luck).
  req.sampling.seed = 12;
  auto other = Generate(rt, req);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->tokens, whole->tokens);
}

TEST(GeneratorTest, StopStringsCancellationAndErrors) {
  auto model = TinyModel(testing::TinyModelSpec{});
  ASSERT_NE(model, nullptr);
  LlamaRuntime rt(*model, RuntimeOptions{});
  GenerationRequest req;
  req.prompt = {5, 6, 7};
  req.max_tokens = 20;
  req.ignore_eos = true;
  auto full = Generate(rt, req);
  ASSERT_TRUE(full.ok());
  ASSERT_GE(full->text.size(), 4u);
  // Stop at the first occurrence of a substring of the greedy text.
  req.stop_strings = {full->text.substr(2, 2)};
  std::string streamed;
  auto stopped = Generate(rt, req, [&](TokenId, std::string_view piece) {
    streamed += piece;
    return true;
  });
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->finish_reason, "stop");
  EXPECT_EQ(stopped->text, full->text.substr(0, full->text.find(req.stop_strings[0])));
  EXPECT_EQ(streamed, stopped->text);

  req.stop_strings.clear();
  int calls = 0;
  auto cancelled = Generate(rt, req, [&](TokenId, std::string_view) { return ++calls < 3; });
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->finish_reason, "cancelled");
  EXPECT_EQ(cancelled->tokens.size(), 3u);

  req.sampling.top_p = 0;
  EXPECT_EQ(Generate(rt, req).status().code(), absl::StatusCode::kInvalidArgument);
  req.sampling.top_p = 1;
  req.prompt.clear();
  EXPECT_EQ(Generate(rt, req).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SamplerTest, GreedyTopKAndSeeds) {
  std::vector<float> logits = {0.1f, 2.0f, 1.9f, -1.0f, 1.0f};
  SamplingParams greedy;
  EXPECT_EQ(Sampler(greedy).Sample(logits.data(), 5), 1);
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 1;
  EXPECT_EQ(Sampler(p).Sample(logits.data(), 5), 1);
  p.top_k = 2;
  p.seed = 3;
  Sampler s1(p), s2(p);
  std::vector<int> counts(5);
  for (int i = 0; i < 2000; ++i) {
    const TokenId a = s1.Sample(logits.data(), 5);
    EXPECT_EQ(a, s2.Sample(logits.data(), 5));  // same seed, same stream
    ++counts[a];
  }
  EXPECT_EQ(counts[0] + counts[3] + counts[4], 0);  // outside the top 2
  // p(1)/p(2) = e^0.1 ~ 1.105 at temperature 1.
  EXPECT_NEAR(static_cast<double>(counts[1]) / counts[2], 1.105, 0.15);
  p.top_k = 0;
  p.top_p = 0.01f;
  EXPECT_EQ(Sampler(p).Sample(logits.data(), 5), 1);
  p.temperature = -1;
  EXPECT_FALSE(p.Validate().ok());
}

}  // namespace
}  // namespace psa

namespace psa {
namespace {

TEST(Utf8Test, IncompleteSuffixAndRepair) {
  EXPECT_EQ(IncompleteUtf8Suffix("abc"), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xE2\x82"), 2u);  // "€" cut short
  EXPECT_EQ(IncompleteUtf8Suffix("a\xE2\x82\xAC"), 0u);
  EXPECT_EQ(ValidUtf8("h\xC3\xA9llo \xF0\x9F\x98\x80"), "h\xC3\xA9llo \xF0\x9F\x98\x80");
  EXPECT_EQ(ValidUtf8("a\x80z"), "a\xEF\xBF\xBDz");          // stray continuation
  EXPECT_EQ(ValidUtf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong '/'
  EXPECT_EQ(ValidUtf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(ValidUtf8("x\xE2\x82"), "x\xEF\xBF\xBD\xEF\xBF\xBD");  // truncated at the end
}

}  // namespace
}  // namespace psa
