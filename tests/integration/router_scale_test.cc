// A thousand concurrent streams through the router to two real workers on
// loopback (a tiny model; each worker decodes one stream at a time and holds
// the rest in its queue, so they all stay open): the router relays them on a
// bounded number of threads, prints its threads and RSS at 1,000 streams,
// and a client's cancellation of all of them reaches the workers.
//
// PSA_SCALE_ROUTER_BIN names another router binary to measure (e.g. an older
// build, for a before/after figure); the bound is still asserted.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "common/http_get.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "tests/support/resume_secret.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;

constexpr int kStreams = 1000;
constexpr int kMaxThreads = 100;

double Metric(const ServerProcess& p, const std::string& series) {
  auto body = psa::HttpGet(p.port("metrics_port"), "/metrics");
  return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : -1;
}

// A field of /proc/<pid>/status ("Threads", "VmRSS" in kB), or -1.
int64_t ProcStatus(pid_t pid, const std::string& field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view rest = line;
    if (!absl::ConsumePrefix(&rest, field + ":")) continue;
    rest = absl::StripAsciiWhitespace(rest);
    absl::ConsumeSuffix(&rest, " kB");
    int64_t value;
    if (absl::SimpleAtoi(rest, &value)) return value;
  }
  return -1;
}

// One client stream, on the callback API (no thread of its own either).
class Stream final : public grpc::ClientReadReactor<psa::v1::GenerateResponse> {
 public:
  Stream(psa::v1::Generation::Stub* stub, int i) {
    request_.set_text(absl::StrCat("stream ", i, " of many"));
    request_.set_max_tokens(3000);
    request_.set_ignore_eos(true);
    request_.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
    ctx_.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
    stub->async()->Generate(&ctx_, &request_, this);
    StartRead(&message_);
    StartCall();
  }
  void Cancel() { ctx_.TryCancel(); }
  bool WaitDone(absl::Duration timeout) { return done_.WaitForNotificationWithTimeout(timeout); }
  const grpc::Status& status() const { return status_; }

 private:
  void OnReadDone(bool ok) override {
    if (ok) StartRead(&message_);
  }
  void OnDone(const grpc::Status& s) override {
    status_ = s;
    done_.Notify();
  }
  grpc::ClientContext ctx_;
  psa::v1::GenerateRequest request_;
  psa::v1::GenerateResponse message_;
  grpc::Status status_;
  absl::Notification done_;
};

TEST(RouterScaleTest, AThousandStreamsOnBoundedThreads) {
  psa::testing::TinyModelSpec spec;  // slow enough that a stream lasts seconds
  spec.n_layer = 4;
  spec.n_embd = 256;
  spec.n_ff = 1024;
  spec.n_ctx = 4096;
  const std::string model =
      psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "scale.gguf");
  std::vector<std::unique_ptr<ServerProcess>> workers;
  for (int i = 0; i < 2; ++i) {
    auto w = ServerProcess::Start(
        PSA_WORKER_BIN, {"--model=" + model, "--listen=127.0.0.1:0",
                         "--metrics_listen=127.0.0.1:0", "--threads=1", "--max_running=1",
                         absl::StrCat("--max_waiting=", kStreams + 100),
                         psa::testing::ResumeSecretFlag()});
    ASSERT_TRUE(w.ok()) << w.status();
    workers.push_back(std::move(*w));
  }
  const char* other = std::getenv("PSA_SCALE_ROUTER_BIN");
  std::vector<std::string> args = {
      "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
      absl::StrCat("--workers=", workers[0]->address(), ",", workers[1]->address()),
      absl::StrCat("--max_inflight=", kStreams + 100), "--max_queued=0", "--affinity_slack=0",
      psa::testing::ResumeSecretFlag()};
  if (other == nullptr) args.push_back("--http_listen=127.0.0.1:0");  // an older one may lack it
  auto r = ServerProcess::Start(other != nullptr ? other : PSA_ROUTER_BIN, args);
  ASSERT_TRUE(r.ok()) << r.status();
  ServerProcess& router = **r;
  const int64_t idle_threads = ProcStatus(router.pid(), "Threads");
  const int64_t idle_rss = ProcStatus(router.pid(), "VmRSS");

  // Several connections, as many clients would open.
  std::vector<std::unique_ptr<psa::v1::Generation::Stub>> stubs;
  for (int i = 0; i < 8; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("psa.test.connection", i);  // a connection of its own
    stubs.push_back(psa::v1::Generation::NewStub(
        grpc::CreateCustomChannel(router.address(), grpc::InsecureChannelCredentials(), args)));
  }
  const absl::Time start = absl::Now();
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(std::make_unique<Stream>(stubs[i % stubs.size()].get(), i));
  }
  // All relayed at once (a worker finishes about one stream a second).
  double active = 0;
  int64_t threads = -1, rss = -1, peak_threads = 0;
  const absl::Time until = absl::Now() + absl::Seconds(60);
  while (absl::Now() < until) {
    active = Metric(router, "psa_router_requests_active");
    threads = ProcStatus(router.pid(), "Threads");
    rss = ProcStatus(router.pid(), "VmRSS");
    peak_threads = std::max(peak_threads, threads);
    if (active >= kStreams - 4) break;  // the first few may have finished
    absl::SleepFor(absl::Milliseconds(20));
  }
  const absl::Duration opened = absl::Now() - start;
  double at_workers = 0;  // the streams reached them: decoding or queued there
  for (auto& w : workers) {
    at_workers +=
        Metric(*w, "psa_worker_requests_running") + Metric(*w, "psa_worker_requests_waiting");
  }
  std::printf("workers hold %.0f streams\n", at_workers);
  EXPECT_GE(at_workers, kStreams - 4);
  std::printf("router %s: %.0f streams relayed at once (after %s): %lld threads (idle %lld, "
              "peak %lld), RSS %.1f MiB (idle %.1f MiB)\n",
              other != nullptr ? other : "under test", active,
              absl::FormatDuration(opened).c_str(), static_cast<long long>(threads),
              static_cast<long long>(idle_threads), static_cast<long long>(peak_threads),
              rss / 1024.0, idle_rss / 1024.0);
  EXPECT_GE(active, kStreams - 4);
  EXPECT_LT(peak_threads, kMaxThreads);

  // The clients cancel; the router passes it on and the workers stop.
  for (auto& s : streams) s->Cancel();
  int cancelled = 0;
  for (auto& s : streams) {
    ASSERT_TRUE(s->WaitDone(absl::Seconds(30)));
    if (s->status().error_code() == grpc::StatusCode::CANCELLED) ++cancelled;
  }
  EXPECT_GE(cancelled, kStreams - 20);
  const absl::Time drained = absl::Now() + absl::Seconds(30);
  auto busy = [&] {
    double n = Metric(router, "psa_router_requests_active");
    for (auto& w : workers) {
      n += Metric(*w, "psa_worker_requests_running") + Metric(*w, "psa_worker_requests_waiting");
    }
    return n;
  };
  while (busy() > 0 && absl::Now() < drained) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(busy(), 0);
  std::printf("after cancelling: %lld threads, RSS %.1f MiB\n",
              static_cast<long long>(ProcStatus(router.pid(), "Threads")),
              ProcStatus(router.pid(), "VmRSS") / 1024.0);
}

}  // namespace
}  // namespace psa
