// The same answer every time: many concurrent greedy streams through the
// router to two workers (block pools far smaller than their KV, prefixes
// shared through two KV shards) with the default policy, run again (prefix
// hits), then with a worker SIGKILLed mid-run (the router resumes its
// streams elsewhere), then with a KV shard SIGKILLed mid-run (the workers
// rebuild what they can no longer fetch). Every stream must succeed and
// equal, token for token, its prompt's solo run in a fresh runtime. The
// default model: the small one, short outputs (CI's budget).
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/attention_policy.h"
#include "common/http_get.h"
#include "common/sha256.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/retrieval_heads.h"
#include "gtest/gtest.h"
#include "tests/support/generate_stream.h"
#include "tests/support/reference_generation.h"
#include "tests/support/resume_secret.h"
#include "tests/support/server_process.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;
using psa::testing::Streamed;

constexpr int kStreams = 8;
constexpr int kTokens = 12;

std::string ModelPath() {
  if (const char* p = std::getenv("PSA_MODEL")) return p;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/root") +
         "/.cache/psa-serve/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// Prompts of ~50 blocks (PSA's floor is 24: its selection matters), half
// sharing a long document (prefix hits), all different at the end.
std::string Prompt(int i) {
  std::string text = i % 2 == 0 ? "Archive of the east wing. " : absl::StrCat("Archive ", i, ". ");
  for (int k = 0; k < 42; ++k) {
    const int n = i % 2 == 0 ? k : k * 7 + i;
    text += absl::StrCat("Ledger ", 1000 + 37 * n, " is kept in cabinet ", n % 23, " of the ",
                         n % 3 == 0 ? "north" : "west", " room. ");
  }
  return absl::StrCat(text, "Question ", i, ": where is ledger ", 1000 + 37 * (i * 5 % 42),
                      " kept? Answer:");
}

double Metric(const ServerProcess& p, const std::string& series) {
  auto body = psa::HttpGet(p.port("metrics_port"), "/metrics");
  return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : -1;
}

class ChaosTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = LlamaModel::Load(ModelPath());
    ASSERT_TRUE(model.ok()) << model.status() << " (scripts/fetch_model.sh fetches it)";
    const Tokenizer& tok = (*model)->tokenizer();
    // Each prompt's solo run in a fresh runtime, with the served default
    // and the retrieval heads the workers mark (the registry's).
    absl::StatusOr<std::string> sha = Sha256File(ModelPath());
    ASSERT_TRUE(sha.ok()) << sha.status();
    absl::StatusOr<std::vector<bool>> sites =
        ResolveRetrievalHeads("registry", *sha, (*model)->hparams());
    ASSERT_TRUE(sites.ok()) << sites.status();
    for (int i = 0; i < kStreams; ++i) {
      solo_.push_back(psa::testing::ReferenceTokens(
          **model, tok.Encode(Prompt(i), tok.add_bos_default(), false), kTokens,
          AttentionPolicy{}, *sites));
    }
    for (int i = 0; i < 2; ++i) {
      auto s = ServerProcess::Start(PSA_KV_SERVICE_BIN, {"--listen=127.0.0.1:0",
                                                         "--metrics_listen=127.0.0.1:0",
                                                         "--capacity=1GiB"});
      ASSERT_TRUE(s.ok()) << s.status();
      shards_.push_back(std::move(*s));
    }
    const std::string shard_list = absl::StrCat(shards_[0]->address(), ",", shards_[1]->address());
    for (int i = 0; i < 2; ++i) {
      // A pool of ~2 sequences' KV for up to 8: pages are evicted and
      // fetched back during attention.
      auto w = ServerProcess::Start(
          PSA_WORKER_BIN,
          {"--model=" + ModelPath(), "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
           "--threads=1", "--kv_shards=" + shard_list, "--kv_pool=48MiB",
           "--prefix_checkpoint_blocks=8", psa::testing::ResumeSecretFlag()},
          absl::Seconds(120));
      ASSERT_TRUE(w.ok()) << w.status();
      workers_.push_back(std::move(*w));
    }
    auto r = ServerProcess::Start(
        PSA_ROUTER_BIN,
        {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--http_listen=127.0.0.1:0",
         absl::StrCat("--workers=", workers_[0]->address(), ",", workers_[1]->address()),
         psa::testing::ResumeSecretFlag()});
    ASSERT_TRUE(r.ok()) << r.status();
    router_ = std::move(*r);
  }

  // Every prompt at once through the router; `during` runs once the first
  // tokens of some stream arrived.
  void RunAll(const std::string& what, const std::function<void()>& during = nullptr) {
    SCOPED_TRACE(what);
    std::vector<Streamed> got(kStreams);
    std::atomic<bool> fired{false};
    std::vector<std::thread> clients;
    for (int i = 0; i < kStreams; ++i) {
      clients.emplace_back([&, i] {
        psa::v1::GenerateRequest r;
        r.set_text(Prompt(i));
        r.set_max_tokens(kTokens);
        r.set_ignore_eos(true);
        got[i] = psa::testing::StreamGenerate(
            router_->address(), r, absl::Seconds(300), [&](const Streamed& so_far) {
              if (during && so_far.tokens.size() >= 3 && !fired.exchange(true)) {
                during();
              }
              return true;
            });
      });
    }
    for (auto& c : clients) c.join();
    if (during) {
      EXPECT_TRUE(fired);
    }
    for (int i = 0; i < kStreams; ++i) {
      ASSERT_TRUE(got[i].status.ok()) << "stream " << i << ": " << got[i].status.error_message();
      EXPECT_EQ(got[i].tokens, solo_[i]) << "stream " << i;
    }
  }

  std::vector<std::vector<TokenId>> solo_;
  std::vector<std::unique_ptr<ServerProcess>> shards_, workers_;
  std::unique_ptr<ServerProcess> router_;
};

TEST_F(ChaosTest, EveryStreamEqualsItsSoloRunThroughRepeatsAndKills) {
  RunAll("first run");
  RunAll("again: prefixes now come from the KV service");
  EXPECT_GT(Metric(*workers_[0], "psa_worker_prefix_cache_hits_total") +
                Metric(*workers_[1], "psa_worker_prefix_cache_hits_total"),
            0);
  RunAll("a worker killed mid-run", [&] {
    for (auto& w : workers_) {
      if (Metric(*w, "psa_worker_requests_running") > 0) {
        kill(w->pid(), SIGKILL);
        return;
      }
    }
  });
  EXPECT_GE(Metric(*router_, "psa_router_resumes_total"), 1);
  RunAll("a KV shard killed mid-run", [&] { kill(shards_[0]->pid(), SIGKILL); });
}

}  // namespace
}  // namespace psa
