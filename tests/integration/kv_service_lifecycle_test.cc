// The KV service's process lifecycle and operations: a killed, hung,
// stopped or restarted shard, health, metrics and server reflection.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "kv_service/kv_client.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/psa/v1/kv_service.grpc.pb.h"
#include "common/http_get.h"
#include "tests/integration/kv_service_testing.h"
#include "tests/support/kv_blocks.h"
#include "tests/support/server_process.h"

namespace psa {
namespace {

using psa::testing::ClientFor;
using psa::testing::MakeBlock;
using psa::testing::ModelLayout;
using psa::testing::SequenceBlocks;
using psa::testing::ServerProcess;
using psa::testing::StartShard;
using ::testing::HasSubstr;

TEST(KvServiceTest, KilledShardFailsPendingFetchesPromptlyNeverWithWrongData) {
  auto shard = StartShard();
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 64, 3)).ok());

  std::atomic<int> ok{0}, wrong{0}, unavailable{0}, other{0}, outstanding{0};
  std::atomic<bool> stop{false};
  std::thread fetcher([&] {
    while (!stop) {
      ++outstanding;
      absl::Status s = client->FetchAsync(
          "s", 0, {1, 2, 3, 4}, absl::Now() + absl::Seconds(30),
          [&](absl::Status status, FetchedBlocks got) {
            if (status.ok()) {
              ++ok;
              if (got.size() != 4 || got.Block(0) != MakeBlock(layout, 0, 1, 3).data()) {
                ++wrong;
              }
            } else if (status.code() == absl::StatusCode::kUnavailable) {
              ++unavailable;
            } else {
              ++other;
            }
            --outstanding;
          });
      if (!s.ok()) {
        --outstanding;
        absl::SleepFor(absl::Milliseconds(1));
      }
    }
  });
  while (ok < 200) absl::SleepFor(absl::Milliseconds(1));
  const absl::Time killed = absl::Now();
  kill(shard->pid(), SIGKILL);
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  fetcher.join();
  while (outstanding > 0 && absl::Now() - killed < absl::Seconds(10)) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(outstanding.load(), 0) << "fetches still pending 10 s after the kill";
  EXPECT_LT(absl::Now() - killed, absl::Seconds(3));
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(other.load(), 0);
  EXPECT_GT(unavailable.load(), 0);

  auto after = client->Fetch("s", 0, {1}, absl::Seconds(5));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
  EXPECT_THAT(after.status().message(), HasSubstr(shard->address()));
}

TEST(KvServiceTest, SigtermDrainsStreamsAndExitsCleanly) {
  auto shard = StartShard();
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 4, 1)).ok());
  ASSERT_TRUE(client->Fetch("s", 0, {0}, absl::Seconds(5)).ok());  // stream open
  const absl::Time start = absl::Now();
  const int status = shard->Stop(SIGTERM);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_LT(absl::Now() - start, absl::Seconds(4)) << "shutdown waited for the stream";
  auto after = client->Fetch("s", 0, {0}, absl::Seconds(5));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
}

TEST(KvServiceTest, HealthServiceAndMetrics) {
  auto shard = StartShard();
  auto channel = grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_TRUE(health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp).ok());
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(psa::HttpGet(shard->port("metrics_port"), "/readyz").value_or(""), "ready\n");

  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 4, 1)).ok());
  ASSERT_TRUE(client->Fetch("s", 0, {0, 1, 2}, absl::Seconds(5)).ok());
  using psa::MetricValue;
  // A finished RPC is counted in the server's OnDone, which may run just
  // after the client has seen its status: scrape until the write shows.
  absl::StatusOr<std::string> body;
  const absl::Time until = absl::Now() + absl::Seconds(10);
  do {
    body = psa::HttpGet(shard->port("metrics_port"), "/metrics");
    ASSERT_TRUE(body.ok()) << body.status();
  } while (MetricValue(*body, "psa_kv_rpc_duration_seconds_count{method=\"WriteBlocks\"}") < 1 &&
           absl::Now() < until);
  EXPECT_EQ(MetricValue(*body, "psa_kv_fetch_bytes_total"), 3 * 12288);
  EXPECT_EQ(MetricValue(*body, "psa_kv_fetch_blocks_total"), 3);
  EXPECT_EQ(MetricValue(*body, "psa_kv_store_blocks"), 4);
  EXPECT_EQ(MetricValue(*body, "psa_kv_store_sequences"), 1);
  EXPECT_EQ(MetricValue(*body, "psa_kv_active_streams{method=\"FetchBlocks\"}"), 1);
  EXPECT_EQ(MetricValue(*body, "psa_kv_rpcs_total{code=\"OK\",method=\"OpenSequence\"}"), 1);
  EXPECT_EQ(
      MetricValue(*body, "psa_kv_rpc_duration_seconds_count{method=\"WriteBlocks\"}"), 1);
  EXPECT_GT(MetricValue(*body, "psa_kv_store_capacity_bytes"), 0);
}

// SIGSTOP takes effect asynchronously; wait until the process shows "T".
void WaitUntilStopped(pid_t pid) {
  for (int i = 0; i < 1000; ++i) {
    std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'T') return;
    absl::SleepFor(absl::Milliseconds(1));
  }
  FAIL() << "process " << pid << " did not stop";
}

// A fetch stream whose deadline passes is counted as DEADLINE_EXCEEDED, one
// its client cancels as CANCELLED (the router and workers count alike).
TEST(KvServiceTest, AnExpiredStreamIsCountedAsDeadlineExceeded) {
  auto shard = StartShard();
  ASSERT_NE(shard, nullptr);
  auto stub = psa::v1::KvService::NewStub(
      grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(300)));
    auto stream = stub->FetchBlocks(&ctx);
    psa::v1::FetchBlocksResponse resp;
    EXPECT_FALSE(stream->Read(&resp));  // nothing asked: ends at the deadline
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    auto stream = stub->FetchBlocks(&ctx);
    absl::SleepFor(absl::Milliseconds(100));
    ctx.TryCancel();
    psa::v1::FetchBlocksResponse resp;
    EXPECT_FALSE(stream->Read(&resp));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  const std::string expired = "psa_kv_rpcs_total{code=\"DEADLINE_EXCEEDED\",method=\"FetchBlocks\"}";
  const std::string cancelled = "psa_kv_rpcs_total{code=\"CANCELLED\",method=\"FetchBlocks\"}";
  absl::StatusOr<std::string> body;
  const absl::Time until = absl::Now() + absl::Seconds(10);
  do {  // counted in the server's OnDone, which may run after the client saw its status
    body = psa::HttpGet(shard->port("metrics_port"), "/metrics");
    ASSERT_TRUE(body.ok()) << body.status();
  } while ((psa::MetricValue(*body, expired) < 1 || psa::MetricValue(*body, cancelled) < 1) &&
           absl::Now() < until);
  EXPECT_EQ(psa::MetricValue(*body, expired), 1);
  EXPECT_EQ(psa::MetricValue(*body, cancelled), 1);
}

TEST(KvServiceTest, FetchDeadlineAppliesWhenTheShardHangs) {
  auto shard = StartShard();
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 2, 1)).ok());
  for (int i = 0; i < 4; ++i) {  // open the streams on every connection
    ASSERT_TRUE(client->Fetch("s", 0, {0}, absl::Seconds(5)).ok());
  }
  kill(shard->pid(), SIGSTOP);  // alive but silent: only the deadline helps
  WaitUntilStopped(shard->pid());
  const absl::Time start = absl::Now();
  auto got = client->Fetch("s", 0, {1}, absl::Milliseconds(300));
  const absl::Duration waited = absl::Now() - start;
  kill(shard->pid(), SIGCONT);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  EXPECT_GE(waited, absl::Milliseconds(290));
  EXPECT_LT(waited, absl::Seconds(2));
  // The stream survives: the next fetch is answered.
  auto again = client->Fetch("s", 0, {1}, absl::Seconds(5));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->ToString() == MakeBlock(layout, 0, 1, 1).data());
}

TEST(KvServiceTest, IdempotentCallsAreRetriedAcrossAShardRestart) {
  auto shard = StartShard();
  const int port = shard->port("grpc_port");
  auto client = ClientFor({shard->address()});
  ASSERT_TRUE(client->Stats(shard->address()).ok());
  shard->Stop(SIGKILL);
  std::unique_ptr<ServerProcess> restarted;
  std::thread restart([&] {
    absl::SleepFor(absl::Milliseconds(300));
    restarted = StartShard({absl::StrCat("--listen=127.0.0.1:", port)});
  });
  // Issued while the shard is down: retried with backoff until it is back.
  auto opened = client->Open("s", ModelLayout());
  restart.join();
  ASSERT_TRUE(restarted != nullptr);
  EXPECT_TRUE(opened.ok()) << opened.status();
  EXPECT_TRUE(opened->created());  // a restarted shard starts empty
}

// Server reflection answers a list_services request (hand-encoded:
// ServerReflectionRequest field 7, list_services = "").
TEST(KvServiceTest, ServerReflectionListsTheService) {
  auto shard = StartShard();
  auto channel = grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  class Reactor : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    void OnWriteDone(bool ok) override { StartWritesDone(); }
    void OnReadDone(bool ok) override {
      if (!ok) return;
      std::vector<grpc::Slice> slices;
      (void)response.Dump(&slices);
      for (const auto& s : slices) text.append(reinterpret_cast<const char*>(s.begin()), s.size());
      StartRead(&response);
    }
    void OnDone(const grpc::Status& s) override {
      status = s;
      done.Notify();
    }
    grpc::ByteBuffer request, response;
    std::string text;
    grpc::Status status;
    absl::Notification done;
  } reactor;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  grpc::Slice list_services(std::string("\x3a\x00", 2));
  reactor.request = grpc::ByteBuffer(&list_services, 1);
  stub.PrepareBidiStreamingCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                grpc::StubOptions(), &reactor);
  reactor.StartWrite(&reactor.request);
  reactor.StartRead(&reactor.response);
  reactor.StartCall();
  ASSERT_TRUE(reactor.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(reactor.status.ok()) << reactor.status.error_message();
  EXPECT_THAT(reactor.text, HasSubstr("psa.v1.KvService"));
  EXPECT_THAT(reactor.text, HasSubstr("grpc.health.v1.Health"));
}

}  // namespace
}  // namespace psa
