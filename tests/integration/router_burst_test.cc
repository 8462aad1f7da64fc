// A burst of 4 MiB prompts against a router and two workers (the default
// model when PSA_MODEL names it, else a tiny one): every worker keeps
// answering its health checks within the router's timeout, the router never
// marks one unhealthy, and every ordinary request sent meanwhile is served.
// The prompts that cannot fit are refused before tokenizing; texts the
// workers must tokenize in full (Tokenize calls) run off gRPC's threads.
#include <atomic>
#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/http_get.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "tests/support/generate_stream.h"
#include "tests/support/resume_secret.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;
using psa::testing::Streamed;
using ::testing::HasSubstr;

constexpr absl::Duration kHealthTimeout = absl::Milliseconds(500);  // the router's default
constexpr size_t kBig = (4 << 20) - (16 << 10);  // ~4 MiB: under gRPC's default limit

double Metric(const ServerProcess& p, const std::string& series) {
  auto body = psa::HttpGet(p.port("metrics_port"), "/metrics");
  return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : -1;
}

// Words, so the tokenizer's pre-tokenizer and merges do real work.
std::string BigText(size_t bytes, int seed) {
  static const char* const kWords[] = {"ledger ", "cabinet ", "holds ", "the ", "of ",
                                       "number ", "quietly ", "1370, ", "river\n", "Ünï "};
  std::string out;
  uint32_t x = seed * 2654435761u + 1;
  while (out.size() < bytes) {
    x = x * 1664525u + 1013904223u;
    out += kWords[(x >> 16) % 10];
  }
  out.resize(bytes);
  while (static_cast<unsigned char>(out.back()) >= 0x80) out.back() = ' ';  // no cut character
  return out;
}

// Checks a worker's health the way the router does, every 100 ms.
class HealthProbe {
 public:
  explicit HealthProbe(const std::string& address)
      : stub_(grpc::health::v1::Health::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))),
        thread_([this] { Run(); }) {}
  ~HealthProbe() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int checks() const { return checks_; }
  int failures() const { return failures_; }
  absl::Duration slowest() const { return absl::Milliseconds(slowest_ms_.load()); }

 private:
  void Run() {
    while (!stop_) {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + kHealthTimeout));
      grpc::health::v1::HealthCheckResponse response;
      const absl::Time start = absl::Now();
      const grpc::Status s = stub_->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response);
      const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - start);
      if (ms > slowest_ms_) slowest_ms_ = ms;
      ++checks_;
      if (!s.ok() || response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
        ++failures_;
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
  }
  std::unique_ptr<grpc::health::v1::Health::Stub> stub_;
  std::atomic<bool> stop_{false};
  std::atomic<int> checks_{0}, failures_{0};
  std::atomic<int64_t> slowest_ms_{0};
  std::thread thread_;
};

TEST(RouterBurstTest, LargePromptsLeaveWorkersHealthyAndOrdinaryRequestsServed) {
  std::string model;
  if (const char* p = std::getenv("PSA_MODEL")) {
    model = p;
  } else {
    psa::testing::TinyModelSpec spec;
    spec.n_ctx = 2048;
    model = psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "burst.gguf");
  }
  std::vector<std::unique_ptr<ServerProcess>> workers;
  for (int i = 0; i < 2; ++i) {
    auto w = ServerProcess::Start(PSA_WORKER_BIN,
                                  {"--model=" + model, "--listen=127.0.0.1:0",
                                   "--metrics_listen=127.0.0.1:0", "--threads=1",
                                   "--max_context=2048", psa::testing::ResumeSecretFlag()},
                                  absl::Seconds(120));
    ASSERT_TRUE(w.ok()) << w.status();
    workers.push_back(std::move(*w));
  }
  auto r = ServerProcess::Start(
      PSA_ROUTER_BIN, {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                       "--http_listen=127.0.0.1:0",
                       absl::StrCat("--workers=", workers[0]->address(), ",",
                                    workers[1]->address()),
                       psa::testing::ResumeSecretFlag()});
  ASSERT_TRUE(r.ok()) << r.status();
  ServerProcess& router = **r;

  std::vector<std::unique_ptr<HealthProbe>> probes;
  for (auto& w : workers) probes.push_back(std::make_unique<HealthProbe>(w->address()));
  std::atomic<bool> burst_over{false};
  std::atomic<int> router_saw_unhealthy{0};
  std::thread router_watch([&] {  // the router's own view, as it routes
    while (!burst_over) {
      for (auto& w : workers) {
        const std::string series =
            absl::StrCat("psa_router_worker_healthy{worker=\"", w->address(), "\"}");
        if (Metric(router, series) == 0) ++router_saw_unhealthy;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  });

  // The burst: 8 prompts of ~4 MiB through the router, and 4 texts of
  // ~4 MiB the workers must tokenize in full; ordinary requests meanwhile.
  constexpr int kBigPrompts = 8, kTokenizes = 4, kOrdinary = 12;
  std::vector<Streamed> big(kBigPrompts), ordinary(kOrdinary);
  std::vector<grpc::Status> tokenized(kTokenizes);
  std::vector<std::thread> clients;
  const absl::Time start = absl::Now();
  for (int i = 0; i < kBigPrompts; ++i) {
    clients.emplace_back([&, i] {
      psa::v1::GenerateRequest req;
      req.set_text(BigText(kBig, i));
      req.set_max_tokens(8);
      big[i] = psa::testing::StreamGenerate(router.address(), req, absl::Seconds(120));
    });
  }
  for (int i = 0; i < kTokenizes; ++i) {
    clients.emplace_back([&, i] {
      // The ids of ~4 MiB of text can outgrow gRPC's default 4 MiB receive
      // limit (the tiny model's vocabulary: ~1 token per 4 bytes).
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(64 << 20);
      auto stub = psa::v1::Generation::NewStub(grpc::CreateCustomChannel(
          workers[i % 2]->address(), grpc::InsecureChannelCredentials(), args));
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(300)));
      psa::v1::TokenizeRequest req;
      req.set_text(BigText(kBig, 100 + i));
      psa::v1::TokenizeResponse resp;
      tokenized[i] = stub->Tokenize(&ctx, req, &resp);
    });
  }
  for (int i = 0; i < kOrdinary; ++i) {
    clients.emplace_back([&, i] {
      absl::SleepFor(absl::Milliseconds(100 * i));  // spread over the burst
      psa::v1::GenerateRequest req;
      req.set_text(absl::StrCat("Name a colour, number ", i, "."));
      req.set_max_tokens(8);
      req.set_ignore_eos(true);
      ordinary[i] = psa::testing::StreamGenerate(router.address(), req, absl::Seconds(120));
    });
  }
  for (auto& c : clients) c.join();
  const absl::Duration took = absl::Now() - start;
  burst_over = true;
  router_watch.join();
  for (auto& p : probes) p->Stop();

  for (int i = 0; i < kBigPrompts; ++i) {
    EXPECT_EQ(big[i].status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
    EXPECT_THAT(big[i].status.error_message(), HasSubstr("cannot fit the context"));
  }
  for (int i = 0; i < kTokenizes; ++i) {
    EXPECT_TRUE(tokenized[i].ok()) << i << ": " << tokenized[i].error_message();
  }
  for (int i = 0; i < kOrdinary; ++i) {
    EXPECT_TRUE(ordinary[i].status.ok()) << i << ": " << ordinary[i].status.error_message();
    EXPECT_EQ(ordinary[i].tokens.size(), 8u) << i;
  }
  for (size_t i = 0; i < probes.size(); ++i) {
    EXPECT_GT(probes[i]->checks(), 0);
    EXPECT_EQ(probes[i]->failures(), 0) << "worker " << i;
    std::printf("worker %zu: %d health checks, %d failed, slowest %s\n", i, probes[i]->checks(),
                probes[i]->failures(), absl::FormatDuration(probes[i]->slowest()).c_str());
  }
  std::printf("burst took %s\n", absl::FormatDuration(took).c_str());
  EXPECT_EQ(router_saw_unhealthy.load(), 0);
  EXPECT_EQ(Metric(router, "psa_router_requests_total{code=\"UNAVAILABLE\"}"), 0);
  EXPECT_EQ(Metric(router, "psa_router_requests_total{code=\"OK\"}"), kOrdinary);

  // Over the router's --max_request_bytes (4 MiB): gRPC refuses the message.
  psa::v1::GenerateRequest over;
  over.set_text(BigText(5 << 20, 7));
  Streamed refused = psa::testing::StreamGenerate(router.address(), over, absl::Seconds(60));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("4194304"));
}

}  // namespace
}  // namespace psa
