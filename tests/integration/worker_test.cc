// The compute worker as deployed: a real psa-worker process on loopback,
// compared with the in-process runtime on the same model.
#include <signal.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/attention/sparse_attention.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "common/http_get.h"
#include "tests/support/generate_stream.h"
#include "tests/support/reference_generation.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;
using ::testing::HasSubstr;

using psa::testing::Streamed;

class Worker {
 public:
  Worker(const std::string& model, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--model=" + model, "--listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0", "--threads=2"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = ServerProcess::Start(PSA_WORKER_BIN, args, absl::Seconds(60));
    EXPECT_TRUE(p.ok()) << p.status();
    process_ = std::move(*p);
    stub_ = psa::v1::Generation::NewStub(
        grpc::CreateChannel(process_->address(), grpc::InsecureChannelCredentials()));
  }

  Streamed Generate(const psa::v1::GenerateRequest& request,
                    absl::Duration timeout = absl::Seconds(120), int cancel_after = -1) {
    return psa::testing::StreamGenerate(
        process_->address(), request, timeout, [cancel_after](const Streamed& so_far) {
          return cancel_after < 0 || static_cast<int>(so_far.tokens.size()) < cancel_after;
        });
  }

  // Every request on its own client thread at once; results in order.
  std::vector<Streamed> GenerateConcurrently(
      const std::vector<psa::v1::GenerateRequest>& requests) {
    std::vector<Streamed> results(requests.size());
    std::vector<std::thread> clients;
    for (size_t i = 0; i < requests.size(); ++i) {
      clients.emplace_back([&, i] { results[i] = Generate(requests[i]); });
    }
    for (auto& c : clients) c.join();
    return results;
  }

  double Metric(const std::string& series) {
    auto body = psa::HttpGet(process_->port("metrics_port"), "/metrics");
    return body.ok() ? psa::MetricValue(*body, series) : -2;
  }

  psa::v1::Generation::Stub* stub() { return stub_.get(); }
  pid_t pid() const { return process_->pid(); }

 private:
  std::unique_ptr<ServerProcess> process_;
  std::unique_ptr<psa::v1::Generation::Stub> stub_;
};

psa::v1::GenerateRequest IdsRequest(const std::vector<TokenId>& prompt, int max_tokens,
                                    psa::v1::AttentionPolicy::Kind kind) {
  psa::v1::GenerateRequest r;
  r.mutable_token_ids();  // set even when empty
  for (TokenId t : prompt) r.mutable_token_ids()->add_ids(t);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  r.mutable_attention()->set_kind(kind);
  return r;
}

std::vector<TokenId> Prompt(int n, int vocab, uint32_t seed) {
  std::vector<TokenId> p;
  uint32_t x = seed * 2654435761u + 7;
  for (int i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    p.push_back(static_cast<TokenId>(x % vocab));
  }
  return p;
}

class TinyWorkerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    psa::testing::TinyModelSpec spec;
    spec.n_ctx = 1024;
    path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "worker.gguf"));
    model_ = LlamaModel::Load(*path_)->release();
    // Slow enough (a few thousand tokens/s) for cancellation to land mid-way.
    psa::testing::TinyModelSpec slow;
    slow.n_layer = 4;
    slow.n_embd = 256;
    slow.n_ff = 1024;
    slow.n_ctx = 4096;
    slow_path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(slow), "slow.gguf"));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete path_;
    delete slow_path_;
  }
  // What the in-process runtime generates (greedy, ignoring EOS).
  static std::vector<TokenId> Reference(const std::vector<TokenId>& prompt, int max_tokens,
                                        const AttentionPolicy& policy) {
    return psa::testing::ReferenceTokens(*model_, prompt, max_tokens, policy);
  }
  int vocab() const { return model_->hparams().n_vocab; }

  static std::string* path_;
  static std::string* slow_path_;
  static LlamaModel* model_;
};
std::string* TinyWorkerTest::path_ = nullptr;
std::string* TinyWorkerTest::slow_path_ = nullptr;
LlamaModel* TinyWorkerTest::model_ = nullptr;

AttentionPolicy Dense() { return psa::testing::DensePolicy(); }

// The worker re-executes itself so that libgomp (which reads its settings
// once, at load) spins briefly; a policy the caller set is kept.
TEST_F(TinyWorkerTest, OpenMpThreadsSpinBrieflyUnlessTheCallerChose) {
  auto environment = [](pid_t pid) {
    std::ifstream in(absl::StrCat("/proc/", pid, "/environ"));
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const char* names[] = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"};
  std::vector<std::optional<std::string>> saved;
  for (const char* name : names) {
    const char* v = std::getenv(name);
    saved.push_back(v != nullptr ? std::optional<std::string>(v) : std::nullopt);
    unsetenv(name);
  }
  {
    Worker worker(*path_);
    EXPECT_THAT(environment(worker.pid()), ::testing::HasSubstr("GOMP_SPINCOUNT=10000"));
    const auto prompt = Prompt(8, vocab(), 3);
    EXPECT_TRUE(worker.Generate(IdsRequest(prompt, 2, psa::v1::AttentionPolicy::KIND_DENSE))
                    .status.ok());
  }
  setenv("OMP_WAIT_POLICY", "active", 1);
  {
    Worker worker(*path_);
    const std::string env = environment(worker.pid());
    EXPECT_THAT(env, ::testing::HasSubstr("OMP_WAIT_POLICY=active"));
    EXPECT_THAT(env, ::testing::Not(::testing::HasSubstr("GOMP_SPINCOUNT")));
  }
  for (size_t i = 0; i < saved.size(); ++i) {
    if (saved[i]) {
      setenv(names[i], saved[i]->c_str(), 1);
    } else {
      unsetenv(names[i]);
    }
  }
}

TEST_F(TinyWorkerTest, DenseGenerationEqualsTheInProcessRuntime) {
  Worker worker(*path_);
  const auto prompt = Prompt(40, vocab(), 1);
  Streamed got = worker.Generate(IdsRequest(prompt, 24, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens, Reference(prompt, 24, Dense()));
  EXPECT_EQ(got.finish_reason, "length");
  EXPECT_EQ(got.usage.prompt_tokens(), 40u);
  EXPECT_EQ(got.usage.completion_tokens(), 24u);
  EXPECT_EQ(got.usage.attention(), "dense");
  EXPECT_EQ(got.usage.kv_blocks_touched(), got.usage.kv_blocks_total());
}

// Penalties through the worker's batch scheduler pick what the in-process
// generation loop picks, change greedy output, and a generation resumed
// with the tokens so far continues exactly as the uninterrupted one.
TEST_F(TinyWorkerTest, PenaltiesMatchTheInProcessRuntimeAndSurviveAResume) {
  Worker worker(*path_);
  const auto prompt = Prompt(30, vocab(), 5);
  constexpr int kTokens = 24, kResumeAt = 9;
  auto request = IdsRequest(prompt, kTokens, psa::v1::AttentionPolicy::KIND_DENSE);
  Streamed plain = worker.Generate(request);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  request.mutable_sampling()->set_repetition_penalty(1.3f);
  request.mutable_sampling()->set_frequency_penalty(0.4f);
  request.mutable_sampling()->set_presence_penalty(0.2f);
  Streamed penalized = worker.Generate(request);
  ASSERT_TRUE(penalized.status.ok()) << penalized.status.error_message();
  ASSERT_EQ(penalized.tokens.size(), static_cast<size_t>(kTokens));
  EXPECT_NE(penalized.tokens, plain.tokens);

  LlamaRuntime runtime(*model_, RuntimeOptions{});
  auto attention = MakeAttention(Dense());
  GenerationRequest reference;
  reference.prompt = prompt;
  reference.max_tokens = kTokens;
  reference.ignore_eos = true;
  reference.attention = attention.get();
  reference.sampling.repetition_penalty = 1.3f;
  reference.sampling.frequency_penalty = 0.4f;
  reference.sampling.presence_penalty = 0.2f;
  auto expected = psa::Generate(runtime, reference);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(penalized.tokens, expected->tokens);

  // Resumed after kResumeAt tokens: those count as generated output.
  auto resumed = request;
  for (int i = 0; i < kResumeAt; ++i) resumed.mutable_resume()->add_token_ids(penalized.tokens[i]);
  Streamed rest = worker.Generate(resumed);
  ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
  EXPECT_EQ(rest.tokens,
            std::vector<TokenId>(penalized.tokens.begin() + kResumeAt, penalized.tokens.end()));
  EXPECT_EQ(rest.usage.completion_tokens(), static_cast<uint32_t>(kTokens));
  // The same tokens sent as prompt are not generated output (frequency and
  // presence skip them): another continuation, so the check above has teeth.
  std::vector<TokenId> as_prompt = prompt;
  as_prompt.insert(as_prompt.end(), penalized.tokens.begin(),
                   penalized.tokens.begin() + kResumeAt);
  auto plain_prompt = IdsRequest(as_prompt, kTokens - kResumeAt,
                                 psa::v1::AttentionPolicy::KIND_DENSE);
  *plain_prompt.mutable_sampling() = request.sampling();
  Streamed other = worker.Generate(plain_prompt);
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  EXPECT_NE(other.tokens, rest.tokens);
}

TEST_F(TinyWorkerTest, PsaAtEpsilonOneEqualsDenseAndDefaultPsaReadsLess) {
  Worker worker(*path_);
  const auto prompt = Prompt(600, vocab(), 2);  // 38 blocks of 16
  auto request = IdsRequest(prompt, 16, psa::v1::AttentionPolicy::KIND_PSA);
  request.mutable_attention()->set_epsilon(1.0f);
  Streamed exact = worker.Generate(request);
  ASSERT_TRUE(exact.status.ok()) << exact.status.error_message();
  EXPECT_EQ(exact.tokens, Reference(prompt, 16, Dense()));

  request.mutable_attention()->set_epsilon(0.5f);
  Streamed sparse = worker.Generate(request);
  ASSERT_TRUE(sparse.status.ok()) << sparse.status.error_message();
  EXPECT_THAT(sparse.usage.attention(), HasSubstr("psa(eps=0.5"));
  EXPECT_LT(sparse.usage.kv_blocks_touched(), sparse.usage.kv_blocks_total());
  // Per-step attention metrics: 15 decode steps per request (the first
  // token comes from the prefill), two requests.
  EXPECT_EQ(worker.Metric(
                "psa_worker_attention_step_selected_fraction_count{epsilon=\"1.00\",policy=\"psa\"}"),
            15);
  EXPECT_EQ(worker.Metric(
                "psa_worker_attention_step_selected_fraction_count{epsilon=\"0.50\",policy=\"psa\"}"),
            15);
  EXPECT_EQ(worker.Metric("psa_worker_attention_blocks_selected_count{layer=\"1\"}"), 30);
  EXPECT_GT(worker.Metric(
                "psa_worker_attention_step_selected_fraction_sum{epsilon=\"1.00\",policy=\"psa\"}"),
            15 * 0.999);  // the epsilon = 1 steps read everything
  EXPECT_LT(worker.Metric(
                "psa_worker_attention_step_selected_fraction_sum{epsilon=\"0.50\",policy=\"psa\"}"),
            14.9);  // the epsilon = 0.5 ones did not
  EXPECT_GT(worker.Metric("psa_worker_attention_iterations_sum"), 30);
}

TEST_F(TinyWorkerTest, ConcurrentSequencesOfMixedLengthsEachMatchTheirSoloRun) {
  Worker worker(*path_, {"--max_running=16", "--step_tokens=256"});
  constexpr int kSequences = 32;
  std::vector<std::vector<TokenId>> prompts;
  std::vector<int> lengths;
  for (int i = 0; i < kSequences; ++i) {
    prompts.push_back(Prompt(5 + 23 * i % 300, vocab(), 100 + i));
    lengths.push_back(4 + i % 13);
  }
  std::vector<psa::v1::GenerateRequest> requests;
  for (int i = 0; i < kSequences; ++i) {
    requests.push_back(IdsRequest(prompts[i], lengths[i], psa::v1::AttentionPolicy::KIND_DENSE));
  }
  const std::vector<Streamed> results = worker.GenerateConcurrently(requests);
  for (int i = 0; i < kSequences; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, Reference(prompts[i], lengths[i], Dense())) << "sequence " << i;
  }
  EXPECT_EQ(worker.Metric("psa_worker_requests_total{outcome=\"length\"}"), kSequences);
  EXPECT_EQ(worker.Metric("psa_worker_requests_running"), 0);
  EXPECT_EQ(worker.Metric("vllm:num_requests_running"), 0);
  EXPECT_EQ(worker.Metric("vllm:num_requests_waiting"), 0);
}

TEST_F(TinyWorkerTest, BadRequestsGetClearErrors) {
  Worker worker(*path_);
  auto expect_invalid = [&](const psa::v1::GenerateRequest& r, const std::string& words) {
    Streamed got = worker.Generate(r);
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << words;
    EXPECT_THAT(got.status.error_message(), HasSubstr(words));
    EXPECT_TRUE(got.tokens.empty());
  };
  psa::v1::GenerateRequest none;
  expect_invalid(none, "no prompt");
  expect_invalid(IdsRequest({1, 2, vocab() + 5}, 4, psa::v1::AttentionPolicy::KIND_DENSE),
                 "outside the vocabulary");
  expect_invalid(IdsRequest({}, 4, psa::v1::AttentionPolicy::KIND_DENSE), "prompt is empty");
  expect_invalid(IdsRequest({1, 2}, 5000, psa::v1::AttentionPolicy::KIND_DENSE),
                 "exceeds the context limit");
  auto bad_eps = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_PSA);
  bad_eps.mutable_attention()->set_epsilon(1.5f);
  expect_invalid(bad_eps, "epsilon");
  auto bad_top_p = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  bad_top_p.mutable_sampling()->set_top_p(2.0f);
  expect_invalid(bad_top_p, "top_p");
  auto bad_repetition = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  bad_repetition.mutable_sampling()->set_repetition_penalty(-1.0f);
  expect_invalid(bad_repetition, "repetition_penalty");
  auto bad_frequency = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  bad_frequency.mutable_sampling()->set_frequency_penalty(2.5f);
  expect_invalid(bad_frequency, "frequency_penalty");
  auto bad_presence = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  bad_presence.mutable_sampling()->set_presence_penalty(std::nanf(""));
  expect_invalid(bad_presence, "presence_penalty");
  psa::v1::GenerateRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("wizard");
  m->set_content("hi");
  expect_invalid(chat, "wizard");
  // The worker still serves.
  EXPECT_TRUE(worker.Generate(IdsRequest({1, 2, 3}, 2, psa::v1::AttentionPolicy::KIND_DENSE))
                  .status.ok());
}

TEST_F(TinyWorkerTest, CancellationAndDeadlinesStopTheSequence) {
  Worker worker(*slow_path_);
  constexpr int kMaxTokens = 4000;
  Streamed cancelled = worker.Generate(
      IdsRequest(Prompt(20, vocab(), 3), kMaxTokens, psa::v1::AttentionPolicy::KIND_DENSE),
      absl::Seconds(60), /*cancel_after=*/3);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  Streamed late = worker.Generate(
      IdsRequest(Prompt(20, vocab(), 4), kMaxTokens, psa::v1::AttentionPolicy::KIND_DENSE),
      absl::Milliseconds(300));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // Both sequences leave the batch: nothing keeps computing for them.
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (worker.Metric("psa_worker_requests_running") != 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(worker.Metric("psa_worker_requests_running"), 0);
  // gRPC's own deadline usually cancels the call before the scheduler sees
  // the deadline pass: either outcome counts.
  auto count = [&](const char* outcome) {
    return std::max(0.0, worker.Metric(absl::StrCat("psa_worker_requests_total{outcome=\"",
                                                    outcome, "\"}")));
  };
  EXPECT_EQ(count("cancelled") + count("DEADLINE_EXCEEDED"), 2);
  EXPECT_LT(worker.Metric("psa_worker_generation_tokens_total"), kMaxTokens);
}

TEST_F(TinyWorkerTest, QueueFullIsResourceExhausted) {
  Worker worker(*slow_path_, {"--max_running=1", "--max_waiting=0"});
  std::atomic<bool> started{false};
  Streamed first;
  std::thread long_one([&] {
    first = worker.Generate(
        IdsRequest(Prompt(10, vocab(), 5), 4000, psa::v1::AttentionPolicy::KIND_DENSE),
        absl::Seconds(3), /*cancel_after=*/-1);
  });
  // Wait until it runs, then the next one has nowhere to go.
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (worker.Metric("psa_worker_requests_running") != 1 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  Streamed second =
      worker.Generate(IdsRequest({1, 2, 3}, 2, psa::v1::AttentionPolicy::KIND_DENSE));
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(second.status.error_message(), HasSubstr("queue is full"));
  long_one.join();
  EXPECT_GT(first.tokens.size(), 0u);
}

TEST_F(TinyWorkerTest, TokenizeAndModelInfo) {
  Worker worker(*path_);
  grpc::ClientContext ctx;
  psa::v1::ModelInfo info;
  ASSERT_TRUE(worker.stub()->GetModelInfo(&ctx, psa::v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.num_layers(), 2u);
  EXPECT_EQ(info.num_kv_heads(), 2u);
  EXPECT_EQ(info.max_context(), 1024u);
  EXPECT_EQ(info.model_id().size(), 64u);  // sha256 hex
  grpc::ClientContext ctx2;
  psa::v1::TokenizeRequest tr;
  tr.set_text("hello world");
  psa::v1::TokenizeResponse tokens;
  ASSERT_TRUE(worker.stub()->Tokenize(&ctx2, tr, &tokens).ok());
  const auto expected = model_->tokenizer().Encode("hello world",
                                                   model_->tokenizer().add_bos_default(), false);
  EXPECT_EQ(std::vector<TokenId>(tokens.token_ids().begin(), tokens.token_ids().end()),
            expected);
}

TEST_F(TinyWorkerTest, PromptPrefixesAreSharedAcrossWorkersThroughTheKvService) {
  auto shard = ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(shard.ok()) << shard.status();
  const std::vector<std::string> kv_flags = {"--kv_shards=" + (*shard)->address(),
                                             "--prefix_checkpoint_blocks=4"};
  Worker a(*path_, kv_flags);
  Worker b(*path_, kv_flags);
  auto wait_published = [](Worker& w, double bytes_before) {
    const absl::Time until = absl::Now() + absl::Seconds(10);
    while (w.Metric("psa_worker_kv_write_bytes_total") <= bytes_before && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return w.Metric("psa_worker_kv_write_bytes_total");
  };

  // Worker A computes and publishes a 200-token prompt (12 full blocks).
  const auto p1 = Prompt(200, vocab(), 7);
  Streamed a1 = a.Generate(IdsRequest(p1, 16, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(a1.status.ok()) << a1.status.error_message();
  EXPECT_EQ(a.Metric("psa_worker_prefix_cache_hits_total"), 0);
  EXPECT_GT(wait_published(a, 0), 0);

  // Worker B loads those 12 blocks instead of computing them: same tokens.
  Streamed b1 = b.Generate(IdsRequest(p1, 16, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(b1.status.ok()) << b1.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 192);
  EXPECT_EQ(b1.tokens, a1.tokens);
  EXPECT_EQ(b1.tokens, Reference(p1, 16, Dense()));

  // A prompt sharing 9 blocks with it finds the 8-block checkpoint, and PSA
  // at epsilon 1 over the loaded blocks (metadata rebuilt) is still exact.
  std::vector<TokenId> p2(p1.begin(), p1.begin() + 150);
  for (TokenId t : Prompt(70, vocab(), 8)) p2.push_back(t);
  auto psa_request = IdsRequest(p2, 16, psa::v1::AttentionPolicy::KIND_PSA);
  psa_request.mutable_attention()->set_epsilon(1.0f);
  Streamed b2 = b.Generate(psa_request);
  ASSERT_TRUE(b2.status.ok()) << b2.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 192 + 128);
  EXPECT_EQ(b2.tokens, Reference(p2, 16, Dense()));

  // Decode publishes checkpoints too: a generation resumed on B from A's
  // prompt plus the tokens A generated loads the last checkpoint (8 blocks of
  // the 40 + 150 tokens A had in its cache) and continues exactly.
  const auto p4 = Prompt(40, vocab(), 10);
  Streamed a4 = a.Generate(IdsRequest(p4, 150, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(a4.status.ok()) << a4.status.error_message();
  // Let A's writer publish the checkpoints: wait until its bytes stop moving.
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  for (double last = -1, now = a.Metric("psa_worker_kv_write_bytes_total");
       now != last && absl::Now() < give_up;
       last = now, now = a.Metric("psa_worker_kv_write_bytes_total")) {
    absl::SleepFor(absl::Milliseconds(300));
  }
  std::vector<TokenId> resumed = p4;
  resumed.insert(resumed.end(), a4.tokens.begin(), a4.tokens.end());
  const double hits_before = b.Metric("psa_worker_prefix_cache_hits_total");
  Streamed b4 = b.Generate(IdsRequest(resumed, 10, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(b4.status.ok()) << b4.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total") - hits_before, 128);
  const auto whole = Reference(p4, 160, Dense());
  EXPECT_EQ(std::vector<TokenId>(whole.begin(), whole.begin() + 150), a4.tokens);
  EXPECT_EQ(b4.tokens, std::vector<TokenId>(whole.begin() + 150, whole.end()));

  // Without the KV service the worker computes everything itself: correct
  // tokens, the failure only counted.
  (*shard)->Stop(SIGKILL);
  const auto p3 = Prompt(120, vocab(), 9);
  Streamed b3 = b.Generate(IdsRequest(p3, 16, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(b3.status.ok()) << b3.status.error_message();
  EXPECT_EQ(b3.tokens, Reference(p3, 16, Dense()));
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 192 + 128 + 128);
  EXPECT_GE(b.Metric("psa_worker_kv_errors_total{op=\"lookup\"}"), 1);
}

// A worker whose KV lives in a block pool far smaller than its sequences'
// KV: pages the KV service stores are evicted and fetched back on demand,
// and every result is still exactly the in-process runtime's.
TEST_F(TinyWorkerTest, PoolFarSmallerThanTheKvGivesExactResults) {
  auto shard = ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(shard.ok()) << shard.status();
  const auto& hp = model_->hparams();
  const int page_bytes = 2 * 16 * hp.head_dim * 2;
  // 64 pages: 16 blocks of the model's 2 layers x 2 KV heads, 256 tokens.
  Worker worker(*path_, {"--kv_shards=" + (*shard)->address(),
                         absl::StrCat("--kv_pool=", 64 * page_bytes),
                         "--prefix_checkpoint_blocks=4", "--max_running=16",
                         "--step_tokens=256"});
  EXPECT_EQ(worker.Metric("psa_worker_kv_pool_capacity_bytes"), 64 * page_bytes);

  const auto prompt = Prompt(600, vocab(), 21);  // 38 blocks: 152 pages
  Streamed dense = worker.Generate(IdsRequest(prompt, 40, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(dense.status.ok()) << dense.status.error_message();
  EXPECT_EQ(dense.tokens, Reference(prompt, 40, Dense()));
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (worker.Metric("psa_worker_kv_write_bytes_total") <= 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(10));  // the prompt is being published
  }

  // PSA at epsilon 1 reads everything: equal to dense. The prompt's prefix
  // is now in the KV service, so this one starts from its metadata alone
  // and fetches every page it reads.
  auto psa_request = IdsRequest(prompt, 40, psa::v1::AttentionPolicy::KIND_PSA);
  psa_request.mutable_attention()->set_epsilon(1.0f);
  const double hits_before = worker.Metric("psa_worker_prefix_cache_hits_total");
  Streamed exact = worker.Generate(psa_request);
  ASSERT_TRUE(exact.status.ok()) << exact.status.error_message();
  EXPECT_EQ(exact.tokens, dense.tokens);
  EXPECT_EQ(worker.Metric("psa_worker_prefix_cache_hits_total") - hits_before, 592);
  EXPECT_GE(worker.Metric("psa_worker_kv_page_fetches_total"), 148);  // 37 blocks x 4 pages
  EXPECT_EQ(worker.Metric("psa_worker_kv_page_fetch_bytes_total"),
            worker.Metric("psa_worker_kv_page_fetches_total") * page_bytes);
  EXPECT_GT(worker.Metric("psa_worker_kv_pool_evictions_total") +
                worker.Metric("psa_worker_kv_pool_scratch_pages_total"),
            0);
  EXPECT_GT(worker.Metric("psa_worker_kv_fetch_stall_seconds_total"), 0);
  EXPECT_LE(worker.Metric("vllm:kv_cache_usage_perc"), 1.0);

  // Short prompts, computed, then loaded from the KV service (the rest of
  // the prompt then prefills in other chunks): exact both times, as decode
  // fills and opens blocks.
  for (int len : {26, 52, 37}) {
    const auto short_prompt = Prompt(len, vocab(), 23 + len);
    for (int run = 0; run < 2; ++run) {
      Streamed got =
          worker.Generate(IdsRequest(short_prompt, 60, psa::v1::AttentionPolicy::KIND_DENSE));
      ASSERT_TRUE(got.status.ok()) << got.status.error_message();
      EXPECT_EQ(got.tokens, Reference(short_prompt, 60, Dense())) << "run " << run << ", " << len;
      absl::SleepFor(absl::Milliseconds(300));  // published before the next run
    }
  }

  // 32 concurrent sequences of mixed lengths share the 64 pages: no
  // deadlock, every one exact.
  constexpr int kSequences = 32;
  std::vector<std::vector<TokenId>> prompts;
  std::vector<int> lengths;
  for (int i = 0; i < kSequences; ++i) {
    prompts.push_back(Prompt(20 + 37 * i % 400, vocab(), 300 + i));
    lengths.push_back(8 + i % 11);
  }
  std::vector<psa::v1::GenerateRequest> requests;
  for (int i = 0; i < kSequences; ++i) {
    requests.push_back(IdsRequest(prompts[i], lengths[i],
                                  i % 2 ? psa::v1::AttentionPolicy::KIND_DENSE
                                        : psa::v1::AttentionPolicy::KIND_PSA));
  }
  const std::vector<Streamed> results = worker.GenerateConcurrently(requests);
  AttentionPolicy psa_default;  // the worker's default epsilon
  for (int i = 0; i < kSequences; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, Reference(prompts[i], lengths[i], i % 2 ? Dense() : psa_default))
        << "sequence " << i;
  }
  EXPECT_EQ(worker.Metric("psa_worker_kv_pool_pinned_pages"), 0);
  EXPECT_LE(worker.Metric("psa_worker_kv_pool_used_bytes"), 64 * page_bytes);

  // The KV service goes away mid-generation: pages the sequence needs can
  // no longer be fetched, so the worker recomputes its cache from the token
  // history and carries on — the same tokens as ever.
  std::thread killer([&] {
    absl::SleepFor(absl::Milliseconds(200));
    (*shard)->Stop(SIGKILL);
  });
  const auto long_prompt = Prompt(700, vocab(), 22);
  Streamed cut = worker.Generate(IdsRequest(long_prompt, 300, psa::v1::AttentionPolicy::KIND_DENSE));
  killer.join();
  ASSERT_TRUE(cut.status.ok()) << cut.status.error_message();
  EXPECT_EQ(cut.tokens, Reference(long_prompt, 300, Dense()));
  EXPECT_GE(worker.Metric("psa_worker_sequence_rebuilds_total"), 1);
}

std::string DefaultModelPath() {
  if (const char* p = std::getenv("PSA_MODEL")) return p;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/root") +
         "/.cache/psa-serve/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// The default model through the worker: dense equals the in-process
// runtime token for token, and PSA on a long prompt reads a fraction of the KV.
TEST(RealModelWorkerTest, DenseMatchesInProcessAndPsaReadsLessOnALongPrompt) {
  auto model = LlamaModel::Load(DefaultModelPath());
  ASSERT_TRUE(model.ok()) << model.status().message()
                          << "\nFetch it with scripts/fetch_model.sh (or set PSA_MODEL).";
  std::string document;
  for (int i = 0; i < 40; ++i) {
    absl::StrAppend(&document, "Section ", i, ": the archive keeps ledger number ", 1000 + 7 * i,
                    " in cabinet ", i % 9, ", next to the maps of the northern coast. ");
  }
  psa::v1::GenerateRequest request;
  auto* system = request.mutable_chat()->add_messages();
  system->set_role("user");
  system->set_content(document + "\nWhich cabinet holds ledger number 1070?");
  request.set_max_tokens(16);
  request.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);

  Worker worker(DefaultModelPath());
  Streamed dense = worker.Generate(request);
  ASSERT_TRUE(dense.status.ok()) << dense.status.error_message();
  EXPECT_GT(dense.usage.prompt_tokens(), 900u);

  // The same prompt ids through the in-process runtime.
  grpc::ClientContext ctx;
  psa::v1::TokenizeRequest tr;
  *tr.mutable_chat() = request.chat();
  psa::v1::TokenizeResponse ids;
  ASSERT_TRUE(worker.stub()->Tokenize(&ctx, tr, &ids).ok());
  LlamaRuntime runtime(**model, RuntimeOptions{});
  auto attention = MakeAttention(Dense());
  GenerationRequest reference;
  reference.prompt.assign(ids.token_ids().begin(), ids.token_ids().end());
  reference.max_tokens = 16;
  reference.attention = attention.get();
  auto expected = psa::Generate(runtime, reference);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(dense.tokens, expected->tokens);
  EXPECT_EQ(dense.text, expected->text);

  request.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_PSA);
  Streamed sparse = worker.Generate(request);
  ASSERT_TRUE(sparse.status.ok()) << sparse.status.error_message();
  EXPECT_GT(sparse.tokens.size(), 0u);
  EXPECT_LT(sparse.usage.kv_blocks_touched(), sparse.usage.kv_blocks_total());
}

// Issue 20: greedy SmolLM2 repeats one line of a short poem until
// max_tokens; psactl chat's default repetition penalty (1.15) stops it.
TEST(RealModelWorkerTest, RepetitionPenaltyStopsAGreedyPoemRepeatingALine) {
  // The most times one non-blank line occurs.
  auto most_repeated_line = [](const std::string& text) {
    std::map<std::string, int> lines;
    int most = 0;
    for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
      most = std::max(most, ++lines[std::string(line)]);
    }
    return most;
  };
  psa::v1::GenerateRequest request;
  auto* user = request.mutable_chat()->add_messages();
  user->set_role("user");
  user->set_content("Write a poem about the sea.");
  request.set_max_tokens(160);
  request.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
  Worker worker(DefaultModelPath());
  Streamed plain = worker.Generate(request);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  EXPECT_GE(most_repeated_line(plain.text), 5) << plain.text;
  request.mutable_sampling()->set_repetition_penalty(1.15f);
  Streamed penalized = worker.Generate(request);
  ASSERT_TRUE(penalized.status.ok()) << penalized.status.error_message();
  EXPECT_LE(most_repeated_line(penalized.text), 1) << penalized.text;
}

// The accuracy bar through the serving path: a worker with a pool of a
// quarter of the KV, pages fetched from a real KV service, PSA at the
// worker's default epsilon against dense on the next token after each of
// 32 consecutive prefixes of a long document (teacher forcing on the text).
TEST(RealModelWorkerTest, PsaAtTheDefaultEpsilonThroughAPoolAgreesWithDense) {
  auto shard = ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(shard.ok()) << shard.status();
  // 2K tokens of the default model's KV: 2048 x 30 layers x 3 heads x 64 x 2 x fp16 = 47 MB.
  Worker worker(DefaultModelPath(), {"--kv_shards=" + (*shard)->address(), "--kv_pool=12MiB"});
  std::string document;
  for (int i = 0; i < 60; ++i) {
    absl::StrAppend(&document, "Entry ", i, ". The harbour office recorded that the ship ",
                    i % 2 ? "Marigold" : "Osprey", " carried ", 40 + 13 * i % 97,
                    " crates of ", i % 3 ? "tea" : "copper wire", " from port ", i % 7,
                    ", and the inspector noted ", i % 5 ? "no damage" : "two broken seals",
                    ". ");
  }
  grpc::ClientContext ctx;
  psa::v1::TokenizeRequest tr;
  tr.set_text(document);
  psa::v1::TokenizeResponse ids;
  ASSERT_TRUE(worker.stub()->Tokenize(&ctx, tr, &ids).ok());
  constexpr int kContext = 1500, kSteps = 32;
  ASSERT_GE(ids.token_ids_size(), kContext + kSteps);
  const std::vector<TokenId> text(ids.token_ids().begin(), ids.token_ids().end());

  int agree = 0;
  double touched = 0, total = 0;
  for (int s = 0; s < kSteps; ++s) {
    const std::vector<TokenId> prompt(text.begin(), text.begin() + kContext + s);
    // Token 0 comes from the (dense) prefill; token 1 is the first decode
    // step, where the policies differ.
    Streamed dense = worker.Generate(IdsRequest(prompt, 2, psa::v1::AttentionPolicy::KIND_DENSE));
    Streamed sparse = worker.Generate(IdsRequest(prompt, 2, psa::v1::AttentionPolicy::KIND_PSA));
    ASSERT_TRUE(dense.status.ok()) << dense.status.error_message();
    ASSERT_TRUE(sparse.status.ok()) << sparse.status.error_message();
    ASSERT_EQ(dense.tokens.size(), 2u);
    ASSERT_EQ(sparse.tokens.size(), 2u);
    ASSERT_EQ(sparse.tokens[0], dense.tokens[0]);
    agree += sparse.tokens[1] == dense.tokens[1];
    touched += sparse.usage.kv_blocks_touched();
    total += sparse.usage.kv_blocks_total();
  }
  std::printf("psa (default epsilon) vs dense through a 25%% pool: top-1 %d/%d, KV read %.1f%%\n",
              agree, kSteps, 100 * touched / total);
  EXPECT_GE(agree, 0.99 * kSteps);
  EXPECT_LT(touched, total);
  EXPECT_GT(worker.Metric("psa_worker_kv_page_fetches_total"), 0);
  EXPECT_GT(worker.Metric("psa_worker_prefix_cache_hits_total"), 0);
}

}  // namespace
}  // namespace psa
