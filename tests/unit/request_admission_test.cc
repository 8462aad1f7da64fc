// Admission on a worker without a server: the tokenizer's bytes-per-token
// bound holds for adversarial texts, requests are refused by their sizes
// and numbers with the values as sent, the prompt queue keeps a thread for
// small prompts, and resume signatures bind the request.
#include "compute_worker/server/request_admission.h"

#include <atomic>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "api/resume_auth.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/model/tokenizer.h"
#include "compute_worker/server/prompt_queue.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Tokenizer> TinyTokenizer(const std::string& kind) {
  testing::TinyModelSpec spec;
  spec.tokenizer = kind;
  auto bytes = testing::BuildTinyLlamaGguf(spec);
  auto file = GgufFile::Parse(bytes.data(), bytes.size(), "tiny");
  EXPECT_TRUE(file.ok()) << file.status().message();
  auto tok = Tokenizer::FromGguf(**file);
  EXPECT_TRUE(tok.ok()) << tok.status().message();
  return tok.ok() ? std::move(*tok) : nullptr;
}

// Texts made to need few tokens: the vocabulary's longest tokens repeated,
// runs of spaces and of U+2581, specials, and random bytes.
std::vector<std::string> AdversarialTexts(const Tokenizer& tok) {
  std::vector<std::string> texts = {std::string(5000, ' '), std::string(5000, 'a'),
                                    std::string(3000, '\n')};
  std::string lower;
  for (int i = 0; i < 1000; ++i) lower += "\xE2\x96\x81";  // U+2581, SentencePiece's space
  texts.push_back(lower);
  // The longest tokens' own bytes, back to back.
  std::vector<TokenId> ids(tok.vocab_size());
  for (TokenId i = 0; i < tok.vocab_size(); ++i) ids[i] = i;
  std::sort(ids.begin(), ids.end(), [&](TokenId a, TokenId b) {
    return tok.TokenBytes(a, true).size() > tok.TokenBytes(b, true).size();
  });
  for (int k = 0; k < std::min<int>(20, ids.size()); ++k) {
    std::string t;
    for (int i = 0; i < 50; ++i) t += tok.TokenBytes(ids[k], /*render_special=*/true);
    texts.push_back(t);
    texts.push_back(" " + t);
    t.clear();
    for (int i = 0; i < 50; ++i) t += tok.TokenText(ids[k]);
    texts.push_back(t);
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 20; ++i) {
    std::string t(2000, '\0');
    for (char& c : t) c = static_cast<char>(rng());
    texts.push_back(t);
  }
  return texts;
}

void ExpectBoundHolds(const Tokenizer& tok) {
  const int per_token = tok.max_input_bytes_per_token();
  ASSERT_GT(per_token, 0);
  for (const std::string& text : AdversarialTexts(tok)) {
    const size_t kept = tok.EncodableBytes(text);
    for (bool special : {false, true}) {
      const size_t tokens = tok.Encode(text, /*add_bos=*/false, special).size();
      EXPECT_GE(tokens * per_token, kept) << text.size() << " bytes (" << kept << " kept) gave "
                                          << tokens << " tokens (bound " << per_token << ")";
    }
  }
}

TEST(TokenizerBoundTest, HoldsForTinyBytePairAndSentencePiece) {
  for (const char* kind : {"gpt2", "llama"}) {
    auto tok = TinyTokenizer(kind);
    ASSERT_NE(tok, nullptr);
    SCOPED_TRACE(kind);
    ExpectBoundHolds(*tok);
  }
}

TEST(TokenizerBoundTest, HoldsForTheDefaultModel) {
  const char* path = std::getenv("PSA_MODEL");
  if (path == nullptr) GTEST_SKIP() << "PSA_MODEL is not set";
  auto model = LlamaModel::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  const Tokenizer& tok = (*model)->tokenizer();
  ExpectBoundHolds(tok);
  // A bound of use: a 4 MiB prompt is refused for an 8K context.
  EXPECT_LT(static_cast<uint64_t>(tok.max_input_bytes_per_token()) * 8192, 4u << 20);
  // Bytes it cannot spell (0xFF, as most BPE vocabularies) are not counted.
  EXPECT_EQ(tok.EncodableBytes(std::string(100, '\xff') + "abc"), 3u);
  EXPECT_TRUE(tok.Encode(std::string(100, '\xff'), false, false).empty());
}

AdmissionLimits Limits() {
  AdmissionLimits l;
  l.n_vocab = 1000;
  l.max_context = 2048;
  l.default_max_tokens = 64;
  l.max_prompt_bytes = 1 << 20;
  l.max_input_bytes_per_token = 16;
  l.adds_bos = true;
  return l;
}

absl::Status Admit(const psa::v1::GenerateRequest& r) { return AdmitGenerateRequest(r, Limits()); }

TEST(AdmissionTest, UnsignedValuesAreNamedAsSent) {
  psa::v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(5);
  r.set_max_tokens(4294967295u);
  absl::Status s = Admit(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("max_tokens is 4294967295"));

  r.set_max_tokens(8);
  r.mutable_token_ids()->add_ids(4294967295u);
  s = Admit(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("token_ids.ids[1] is 4294967295"));

  r.mutable_token_ids()->set_ids(1, 6);
  r.mutable_resume()->add_token_ids(7);
  r.mutable_resume()->add_token_ids(4000000000u);
  s = Admit(r);
  EXPECT_THAT(s.message(), HasSubstr("resume.token_ids[1] is 4000000000"));

  r.clear_resume();
  r.mutable_sampling()->set_top_k(4294967295u);
  ASSERT_TRUE(Admit(r).ok());
  const GenerationRequest gen = ToGenerationRequest(r, PromptTokenIds(r), Limits());
  EXPECT_EQ(gen.sampling.top_k, 0);  // all of the vocabulary: no limit
  EXPECT_EQ(gen.max_tokens, 8);
  EXPECT_EQ(gen.prompt, (std::vector<TokenId>{5, 6}));
}

TEST(AdmissionTest, TextThatCannotFitIsRefusedBySize) {
  psa::v1::GenerateRequest r;
  // 2048 tokens of context, 64 for output, 1 BOS: 1983 prompt tokens of at
  // most 16 bytes each fit 31728 bytes.
  r.set_text(std::string(1983 * 16, 'x'));
  EXPECT_TRUE(Admit(r).ok());
  r.set_text(std::string(1983 * 16 + 1, 'x'));
  absl::Status s = Admit(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("text is 31729 bytes, so at least 1985 tokens"));
  EXPECT_THAT(s.message(), HasSubstr("context limit of 2048"));
  r.set_max_tokens(1);  // a smaller answer makes room
  EXPECT_TRUE(Admit(r).ok());
  r.set_text(std::string((1 << 20) + 1, 'x'));
  s = Admit(r);
  EXPECT_THAT(s.message(), HasSubstr("text is 1048577 bytes; the worker takes at most 1048576"));

  AdmissionLimits no_bound = Limits();
  no_bound.max_input_bytes_per_token = 0;  // e.g. an incomplete vocabulary
  r.set_text(std::string(500000, 'x'));
  EXPECT_TRUE(AdmitGenerateRequest(r, no_bound).ok());
}

TEST(AdmissionTest, ChatAndMissingPrompt) {
  psa::v1::GenerateRequest r;
  EXPECT_THAT(Admit(r).message(), HasSubstr("no prompt"));
  r.mutable_chat();
  EXPECT_THAT(Admit(r).message(), HasSubstr("chat has no messages"));
  r.mutable_chat()->add_messages()->set_content(std::string((1 << 20) + 5, ' '));
  EXPECT_THAT(Admit(r).message(), HasSubstr("1048581 bytes"));
}

TEST(PromptQueueTest, SmallPromptsPassALargeBacklog) {
  absl::Notification release;  // outlives the queue, whose tasks wait on it
  std::atomic<int> large_started{0};
  PromptQueue::Options o;
  o.threads = 2;
  PromptQueue queue(o);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(queue.Post(4 << 20, [&] {
      ++large_started;
      release.WaitForNotification();
    }).ok());
  }
  // One thread holds a large prompt; the other stays free for small ones.
  // (Wait for the large one to start: else the small one may run first and
  // the count below is read before any large prompt began.)
  for (int i = 0; i < 1000 && large_started.load() == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(large_started.load(), 1);
  absl::Notification small_ran;
  ASSERT_TRUE(queue.Post(100, [&] { small_ran.Notify(); }).ok());
  EXPECT_TRUE(small_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(large_started.load(), 1);
  release.Notify();
}

TEST(PromptQueueTest, RefusesBeyondItsLimits) {
  absl::Notification release;
  absl::Notification running;
  PromptQueue::Options o;
  o.threads = 1;
  o.max_queued = 2;
  o.max_queued_bytes = 1000;
  PromptQueue queue(o);
  ASSERT_TRUE(queue.Post(10, [&] {
    running.Notify();
    release.WaitForNotification();
  }).ok());
  running.WaitForNotification();
  EXPECT_TRUE(queue.Post(600, [] {}).ok());
  absl::Status s = queue.Post(600, [] {});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("1 prompts (600 bytes) waiting"));
  EXPECT_TRUE(queue.Post(100, [] {}).ok());
  EXPECT_EQ(queue.Post(1, [] {}).code(), absl::StatusCode::kResourceExhausted);  // 2 queued
  release.Notify();
}

TEST(ResumeAuthTest, SignatureBindsTheResumeAndThePrompt) {
  const ResumeAuth auth("0123456789abcdef-secret");
  psa::v1::GenerateRequest r;
  r.set_text("hello");
  r.set_max_tokens(10);
  r.mutable_resume()->add_token_ids(42);
  r.mutable_resume()->set_text_bytes(3);
  const std::string sig = auth.Sign(r);
  EXPECT_TRUE(auth.Verify(r, sig).ok());
  EXPECT_EQ(auth.Verify(r, "").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ResumeAuth("another-secret-of-16").Verify(r, sig).code(),
            absl::StatusCode::kPermissionDenied);
  for (int change = 0; change < 4; ++change) {
    psa::v1::GenerateRequest altered = r;
    if (change == 0) altered.mutable_resume()->add_token_ids(43);
    if (change == 1) altered.mutable_resume()->set_text_bytes(4);
    if (change == 2) altered.set_text("hello!");
    if (change == 3) altered.set_max_tokens(11);
    EXPECT_EQ(auth.Verify(altered, sig).code(), absl::StatusCode::kPermissionDenied) << change;
  }
}

TEST(ResumeAuthTest, SecretFileMustHoldEnough) {
  const std::string path = testing::WriteTempFile({'s', 'h', 'o', 'r', 't', '\n'}, "short.secret");
  absl::StatusOr<ResumeAuth> a = ResumeAuth::FromFile(path);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(a.status().message(), HasSubstr("is 5 bytes; it must be at least 16"));
  EXPECT_FALSE(ResumeAuth::FromFile("/nonexistent/secret").ok());
}

}  // namespace
}  // namespace psa
