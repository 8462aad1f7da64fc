// The compute worker as deployed: a real psa-worker process on loopback,
// compared with the in-process runtime on the same model (tiny models).
#include "tests/integration/worker_testing.h"

namespace psa {
namespace {

using namespace psa::worker_testing;  // NOLINT: the binary's shared helpers
using psa::testing::ServerProcess;
using psa::testing::Streamed;
using ::testing::HasSubstr;

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
  Streamed rest = worker.GenerateResumed(resumed);
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
  // gRPC cancels the call when its deadline passes: still counted as a
  // deadline, not as a cancellation.
  auto count = [&](const char* outcome) {
    return std::max(0.0, worker.Metric(absl::StrCat("psa_worker_requests_total{outcome=\"",
                                                    outcome, "\"}")));
  };
  EXPECT_EQ(count("cancelled"), 1);
  EXPECT_EQ(count("DEADLINE_EXCEEDED"), 1);
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

}  // namespace
}  // namespace psa
