// The worker with the KV service: prompt prefixes shared across workers,
// and a block pool far smaller than the KV (tiny models).
#include "tests/integration/worker_testing.h"

namespace psa {
namespace {

using namespace psa::worker_testing;  // NOLINT: the binary's shared helpers
using psa::testing::ServerProcess;
using psa::testing::Streamed;
using ::testing::HasSubstr;

// A KV shard, and the flags of workers that publish prompt prefixes to it
// (a checkpoint every 4 blocks); null if it does not start.
std::unique_ptr<ServerProcess> StartKvShard(std::vector<std::string>* kv_flags) {
  auto shard = ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
  EXPECT_TRUE(shard.ok()) << shard.status();
  if (!shard.ok()) return nullptr;
  *kv_flags = {"--kv_shards=" + (*shard)->address(), "--prefix_checkpoint_blocks=4"};
  return std::move(*shard);
}

// The bytes `w` has written to the KV service, once more than bytes_before
// (or after 10 s).
double WaitPublished(Worker& w, double bytes_before) {
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (w.Metric("psa_worker_kv_write_bytes_total") <= bytes_before && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  return w.Metric("psa_worker_kv_write_bytes_total");
}

// A cache salt (a tenant's scope, set by the router from the API key)
// partitions prefix reuse: blocks one salt stored are invisible to another,
// so one tenant can neither read nor poison another's prefixes.
TEST_F(TinyWorkerTest, CacheSaltsScopePrefixReuse) {
  std::vector<std::string> kv_flags;
  const std::unique_ptr<ServerProcess> shard = StartKvShard(&kv_flags);
  ASSERT_NE(shard, nullptr);
  Worker a(*path_, kv_flags);
  Worker b(*path_, kv_flags);
  const auto p = Prompt(200, vocab(), 21);
  auto request = [&](const std::string& salt) {
    auto r = IdsRequest(p, 8, psa::v1::AttentionPolicy::KIND_DENSE);
    r.set_cache_salt(salt);
    return r;
  };
  Streamed a1 = a.Generate(request("tenant/a/"));
  ASSERT_TRUE(a1.status.ok()) << a1.status.error_message();
  ASSERT_GT(WaitPublished(a, 0), 0);

  // Another salt: nothing found; computed afresh, the same tokens.
  Streamed b1 = b.Generate(request("tenant/b/"));
  ASSERT_TRUE(b1.status.ok()) << b1.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 0);
  EXPECT_EQ(b1.tokens, a1.tokens);
  // The same salt: A's 12 blocks are loaded (B has published only under
  // "tenant/b/" so far, so these can only be A's).
  Streamed b2 = b.Generate(request("tenant/a/"));
  ASSERT_TRUE(b2.status.ok()) << b2.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 192);
  EXPECT_EQ(b2.tokens, a1.tokens);
  // No salt: none of the salted blocks.
  Streamed b3 = b.Generate(request(""));
  ASSERT_TRUE(b3.status.ok()) << b3.status.error_message();
  EXPECT_EQ(b.Metric("psa_worker_prefix_cache_hits_total"), 192);
  EXPECT_EQ(b3.tokens, a1.tokens);
}

TEST_F(TinyWorkerTest, PromptPrefixesAreSharedAcrossWorkersThroughTheKvService) {
  std::vector<std::string> kv_flags;
  const std::unique_ptr<ServerProcess> shard = StartKvShard(&kv_flags);
  ASSERT_NE(shard, nullptr);
  Worker a(*path_, kv_flags);
  Worker b(*path_, kv_flags);

  // Worker A computes and publishes a 200-token prompt (12 full blocks).
  const auto p1 = Prompt(200, vocab(), 7);
  Streamed a1 = a.Generate(IdsRequest(p1, 16, psa::v1::AttentionPolicy::KIND_DENSE));
  ASSERT_TRUE(a1.status.ok()) << a1.status.error_message();
  EXPECT_EQ(a.Metric("psa_worker_prefix_cache_hits_total"), 0);
  EXPECT_GT(WaitPublished(a, 0), 0);
  // A's lookups missed: not errors. Dropped publishes have their own counter.
  EXPECT_EQ(a.Metric("psa_worker_kv_errors_total{op=\"lookup\"}"), -1);  // never failed
  EXPECT_EQ(a.Metric("psa_worker_kv_publishes_dropped_total{reason=\"queue_full\"}"), 0);

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
  shard->Stop(SIGKILL);
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

}  // namespace
}  // namespace psa
