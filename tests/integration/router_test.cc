// The router in front of real worker processes (tiny models), on loopback.
#include <signal.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "compute_worker/model/llama_model.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "common/http_get.h"
#include "tests/support/generate_stream.h"
#include "tests/support/reference_generation.h"
#include "tests/support/resume_secret.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;
using ::testing::HasSubstr;

using psa::testing::Streamed;

Streamed Generate(const std::string& address, const psa::v1::GenerateRequest& request,
                  absl::Duration timeout = absl::Seconds(120),
                  const std::function<void(const Streamed&)>& on_message = nullptr) {
  return psa::testing::StreamGenerate(address, request, timeout, [&](const Streamed& so_far) {
    if (on_message) on_message(so_far);
    return true;
  });
}

double Metric(const ServerProcess& p, const std::string& series) {
  auto body = psa::HttpGet(p.port("metrics_port"), "/metrics");
  return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : -1;
}

psa::v1::GenerateRequest Request(const std::string& text, int max_tokens) {
  psa::v1::GenerateRequest r;
  r.set_text(text);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  r.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
  return r;
}

class RouterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Slow enough (a few thousand tokens/s) for a kill to land mid-stream.
    psa::testing::TinyModelSpec spec;
    spec.n_layer = 4;
    spec.n_embd = 256;
    spec.n_ff = 1024;
    spec.n_ctx = 4096;
    path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "router.gguf"));
  }
  static void TearDownTestSuite() { delete path_; }

  void StartCluster(std::vector<std::string> router_flags = {}) {
    for (int i = 0; i < 2; ++i) {
      auto w = ServerProcess::Start(PSA_WORKER_BIN, {"--model=" + *path_, "--listen=127.0.0.1:0",
                                                     "--metrics_listen=127.0.0.1:0",
                                                     "--threads=1",
                                                     psa::testing::ResumeSecretFlag()});
      ASSERT_TRUE(w.ok()) << w.status();
      workers_.push_back(std::move(*w));
    }
    std::vector<std::string> args = {
        "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--http_listen=127.0.0.1:0",
        absl::StrCat("--workers=", workers_[0]->address(), ",", workers_[1]->address()),
        psa::testing::ResumeSecretFlag()};
    args.insert(args.end(), router_flags.begin(), router_flags.end());
    auto r = ServerProcess::Start(PSA_ROUTER_BIN, args);
    ASSERT_TRUE(r.ok()) << r.status();
    router_ = std::move(*r);
  }
  // Which worker served most recently started requests (by their counters).
  int Served(int i) {
    return Metric(*workers_[i], "psa_worker_requests_total{outcome=\"length\"}");
  }
  std::vector<TokenId> Reference(const std::string& text, int max_tokens) {
    auto model = LlamaModel::Load(*path_);
    EXPECT_TRUE(model.ok());
    const Tokenizer& tok = (*model)->tokenizer();
    return psa::testing::ReferenceTokens(**model, tok.Encode(text, tok.add_bos_default(), false),
                                         max_tokens);
  }

  static std::string* path_;
  std::vector<std::unique_ptr<ServerProcess>> workers_;
  std::unique_ptr<ServerProcess> router_;
};
std::string* RouterTest::path_ = nullptr;

TEST_F(RouterTest, GenerationThroughTheRouterEqualsThroughAWorker) {
  StartCluster();
  const auto request = Request("hello router", 20);
  Streamed via_router = Generate(router_->address(), request);
  Streamed direct = Generate(workers_[1]->address(), request);
  ASSERT_TRUE(via_router.status.ok()) << via_router.status.error_message();
  ASSERT_TRUE(direct.status.ok());
  EXPECT_EQ(via_router.tokens, direct.tokens);
  EXPECT_EQ(via_router.text, direct.text);
  EXPECT_EQ(via_router.finish_reason, "length");
  EXPECT_EQ(Metric(*router_, "psa_router_requests_total{code=\"OK\"}"), 1);
}

TEST_F(RouterTest, AffinitySendsARepeatedPrefixToTheSameWorker) {
  StartCluster();
  const std::string document(1500, 'a');  // past the affinity window
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(Generate(router_->address(),
                         Request(absl::StrCat(document, " question ", i), 4)).status.ok());
  }
  EXPECT_EQ(std::max(Served(0), Served(1)), 6);
  EXPECT_EQ(std::min(Served(0), Served(1)), 0);
}

TEST_F(RouterTest, AWorkerKilledMidStreamIsInvisibleToTheClient) {
  StartCluster();
  constexpr int kTokens = 1500;
  const auto request = Request("a long story", kTokens);
  std::atomic<bool> killed{false};
  Streamed got = Generate(router_->address(), request, absl::Seconds(120),
                          [&](const Streamed& so_far) {
                            if (killed || so_far.tokens.size() < 50) return;
                            killed = true;
                            for (auto& w : workers_) {  // the one computing it
                              if (Metric(*w, "psa_worker_requests_running") == 1) {
                                kill(w->pid(), SIGKILL);
                              }
                            }
                          });
  ASSERT_TRUE(killed);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.finish_reason, "length");
  EXPECT_EQ(got.tokens, Reference("a long story", kTokens));  // complete, no duplicates
  EXPECT_EQ(Metric(*router_, "psa_router_resumes_total"), 1);
}

TEST_F(RouterTest, AWorkerDeadBeforeTheFirstTokenIsRetriedElsewhere) {
  StartCluster({"--health_interval_ms=600000"});  // the router will not notice by itself
  const auto request = Request("which worker?", 8);
  ASSERT_TRUE(Generate(router_->address(), request).status.ok());
  const int preferred = Served(0) == 1 ? 0 : 1;
  workers_[preferred]->Stop(SIGKILL);
  Streamed got = Generate(router_->address(), request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens.size(), 8u);
  EXPECT_EQ(Served(1 - preferred), 1);
  EXPECT_EQ(Metric(*router_, "psa_router_retries_total"), 1);
}

TEST_F(RouterTest, AdmissionControlAndDeadlines) {
  StartCluster({"--max_inflight=1", "--max_queued=1"});
  std::atomic<bool> running{false};
  std::thread long_one([&] {
    Generate(router_->address(), Request("long", 3000), absl::Seconds(60),
             [&](const Streamed&) { running = true; });
  });
  while (!running) absl::SleepFor(absl::Milliseconds(5));
  Streamed queued;
  std::thread waiting_one([&] { queued = Generate(router_->address(), Request("queued", 2)); });
  while (Metric(*router_, "psa_router_requests_queued") != 1) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  Streamed refused = Generate(router_->address(), Request("short", 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("retry"));
  long_one.join();
  waiting_one.join();
  EXPECT_TRUE(queued.status.ok()) << queued.status.error_message();  // ran once a slot freed
  EXPECT_EQ(queued.tokens.size(), 2u);

  Streamed late = Generate(router_->address(), Request("late", 3000), absl::Milliseconds(300));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The worker stops computing it.
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while ((Metric(*workers_[0], "psa_worker_requests_running") +
          Metric(*workers_[1], "psa_worker_requests_running")) > 0 &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Metric(*workers_[0], "psa_worker_requests_running") +
                Metric(*workers_[1], "psa_worker_requests_running"),
            0);
  // Counted as what it was, by the router and the worker alike.
  EXPECT_EQ(Metric(*router_, "psa_router_requests_total{code=\"DEADLINE_EXCEEDED\"}"), 1);
  EXPECT_EQ(Metric(*router_, "psa_router_requests_total{code=\"CANCELLED\"}"), 0);
  auto outcome = [&](const std::string& o) {
    const std::string series = absl::StrCat("psa_worker_requests_total{outcome=\"", o, "\"}");
    return Metric(*workers_[0], series) + Metric(*workers_[1], series);
  };
  EXPECT_EQ(outcome("DEADLINE_EXCEEDED"), 1);
  EXPECT_EQ(outcome("cancelled") + outcome("CANCELLED"), 0);
}

// GenerateRequest.resume comes from the router only: a client's is refused
// at the router and at a worker, and the usage it would forge never counts.
TEST_F(RouterTest, AClientCannotSendAResume) {
  StartCluster();
  auto forged = Request("forge", 4);
  forged.mutable_resume()->add_token_ids(1);
  forged.mutable_resume()->add_token_ids(2);
  Streamed via_router = Generate(router_->address(), forged);
  EXPECT_EQ(via_router.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(via_router.status.error_message(), HasSubstr("clients must not set it"));
  for (auto& w : workers_) {
    Streamed direct = Generate(w->address(), forged);
    EXPECT_EQ(direct.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(direct.status.error_message(), HasSubstr("router only"));
    EXPECT_TRUE(direct.tokens.empty());
    EXPECT_EQ(Metric(*w, "psa_worker_generation_tokens_total"), 0);
  }
  EXPECT_TRUE(Generate(router_->address(), Request("forge", 4)).status.ok());  // still serves
}

TEST_F(RouterTest, WorkersFoundThroughDns) {
  StartCluster();
  // "localhost" resolves to 127.0.0.1: one worker, found by name.
  auto r = ServerProcess::Start(
      PSA_ROUTER_BIN, {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                       "--http_listen=127.0.0.1:0",
                       absl::StrCat("--workers_dns=localhost:", workers_[1]->port("grpc_port"))});
  ASSERT_TRUE(r.ok()) << r.status();
  Streamed got = Generate((*r)->address(), Request("by name", 5));
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(Served(1), 1);
  EXPECT_EQ(Metric(**r, absl::StrCat("psa_router_worker_healthy{worker=\"127.0.0.1:",
                                     workers_[1]->port("grpc_port"), "\"}")),
            1);
}

TEST_F(RouterTest, WorkersFileRecoveryAndClientCancellation) {
  StartCluster();  // for the workers; this test runs its own router
  const std::string file = absl::StrCat(::testing::TempDir(), "/workers.txt");
  {
    std::ofstream out(file);
    out << "# the cluster's workers\n"
        << workers_[0]->address() << "\n\n"
        << workers_[1]->address() << "\n";
  }
  auto r = ServerProcess::Start(PSA_ROUTER_BIN, {"--listen=127.0.0.1:0",
                                                 "--metrics_listen=127.0.0.1:0",
                                                 "--http_listen=127.0.0.1:0",
                                                 "--workers_file=" + file,
                                                 "--health_interval_ms=100"});
  ASSERT_TRUE(r.ok()) << r.status();
  ServerProcess& router = **r;
  const std::string healthy1 =
      absl::StrCat("psa_router_worker_healthy{worker=\"", workers_[1]->address(), "\"}");
  auto wait_for = [&](const std::string& series, double value) {
    const absl::Time until = absl::Now() + absl::Seconds(20);
    while (Metric(router, series) != value && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    return Metric(router, series);
  };
  EXPECT_EQ(wait_for(healthy1, 1), 1);

  // A worker that fails is taken out, and back in once it answers again.
  const int port = workers_[1]->port("grpc_port");
  workers_[1]->Stop(SIGKILL);
  EXPECT_EQ(wait_for(healthy1, 0), 0);
  auto back = ServerProcess::Start(PSA_WORKER_BIN, {"--model=" + *path_,
                                                    absl::StrCat("--listen=127.0.0.1:", port),
                                                    "--metrics_listen=127.0.0.1:0",
                                                    "--threads=1",
                                                    psa::testing::ResumeSecretFlag()});
  ASSERT_TRUE(back.ok()) << back.status();
  workers_[1] = std::move(*back);
  EXPECT_EQ(wait_for(healthy1, 1), 1);

  // A client that cancels stops the worker's computation too.
  Streamed cancelled;
  {
    auto stub = psa::v1::Generation::NewStub(
        grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, Request("cancel me", 3000));
    psa::v1::GenerateResponse message;
    while (reader->Read(&message)) {
      cancelled.tokens.insert(cancelled.tokens.end(), message.token_ids().begin(),
                              message.token_ids().end());
      if (cancelled.tokens.size() >= 5) ctx.TryCancel();
    }
    cancelled.status = reader->Finish();
  }
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (Metric(*workers_[0], "psa_worker_requests_running") +
                 Metric(*workers_[1], "psa_worker_requests_running") > 0 &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Metric(*workers_[0], "psa_worker_requests_running") +
                Metric(*workers_[1], "psa_worker_requests_running"),
            0);
  EXPECT_EQ(Metric(*workers_[0], "psa_worker_requests_total{outcome=\"cancelled\"}") +
                Metric(*workers_[1], "psa_worker_requests_total{outcome=\"cancelled\"}"),
            1);
}

}  // namespace
}  // namespace psa
