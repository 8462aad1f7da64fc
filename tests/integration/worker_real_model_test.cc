// The default model through a real psa-worker: dense equals the in-process
// runtime, PSA reads less and agrees through a pool, penalties stop loops.
#include "tests/integration/worker_testing.h"

namespace psa {
namespace {

using namespace psa::worker_testing;  // NOLINT: the binary's shared helpers
using psa::testing::ServerProcess;
using psa::testing::Streamed;
using ::testing::HasSubstr;

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
