// WorkerPool against real gRPC servers on loopback, with discovery injected
// (WorkerPoolOptions::discover, the seam --workers_dns goes through): a
// worker that leaves discovery is forgotten with its metric series (after a
// grace, not on a blip), one that comes back is added again, a generation in
// flight on a forgotten worker still finishes, and unreachable workers' health
// checks take one deadline together, not one each.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/http_get.h"
#include "common/metrics_http_server.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "router/router_service.h"
#include "router/worker_pool.h"

namespace psa {
namespace {

using ::testing::ElementsAre;
using ::testing::UnorderedElementsAre;

// A worker stand-in: grpc.health.v1 (SERVING) and a Generate that sends one
// token, then the last one once `release` is notified.
class FakeWorker final : public psa::v1::Generation::Service {
 public:
  FakeWorker() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
  }
  ~FakeWorker() override {
    if (!release.HasBeenNotified()) release.Notify();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

  grpc::Status Generate(grpc::ServerContext*, const psa::v1::GenerateRequest*,
                        grpc::ServerWriter<psa::v1::GenerateResponse>* writer) override {
    psa::v1::GenerateResponse first;
    first.add_token_ids(7);
    writer->Write(first);
    started.Notify();
    release.WaitForNotificationWithTimeout(absl::Seconds(20));
    psa::v1::GenerateResponse last;
    last.add_token_ids(8);
    last.set_finish_reason("length");
    writer->Write(last);
    return grpc::Status::OK;
  }

  absl::Notification started, release;

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// A TCP port that accepts connections (the kernel's backlog) but never
// speaks: a health check to it runs into its deadline, like a dead pod's IP.
class BlackHole {
 public:
  BlackHole() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0 && listen(fd_, 16) == 0) {
      getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
      port_ = ntohs(addr.sin_port);
    }
  }
  ~BlackHole() { close(fd_); }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// What discovery answers: a list the test edits, or a failed lookup.
struct Discovery {
  absl::Mutex mu;
  std::vector<std::string> answer;
  bool failing = false;
  std::function<absl::StatusOr<std::vector<std::string>>()> Fn() {
    return [this]() -> absl::StatusOr<std::vector<std::string>> {
      absl::MutexLock lock(&mu);
      if (failing) return absl::UnavailableError("DNS blip");
      return answer;
    };
  }
  void Set(std::vector<std::string> a, bool fail = false) {
    absl::MutexLock lock(&mu);
    answer = std::move(a);
    failing = fail;
  }
};

template <typename F>
bool WaitFor(F done, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > end) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

std::string Series(const std::string& address) {
  return absl::StrCat("psa_router_worker_healthy{worker=\"", address, "\"}");
}

class WorkerPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = metrics::MetricsHttpServer::Start(&registry_, "127.0.0.1", 0);
    ASSERT_TRUE(server.ok()) << server.status();
    metrics_server_ = std::move(*server);
  }
  // The value of a worker's series on /metrics, or -1 without one.
  double Healthy(const std::string& address) {
    auto body = HttpGet(metrics_server_->port(), "/metrics");
    return body.ok() ? MetricValue(*body, Series(address)) : -2;
  }
  WorkerPoolOptions Options(int forget_after_polls) {
    WorkerPoolOptions o;
    o.discover = discovery_.Fn();
    o.forget_after_polls = forget_after_polls;
    o.health_interval = absl::Milliseconds(30);
    o.health_timeout = absl::Milliseconds(500);
    return o;
  }

  metrics::Registry registry_;
  std::unique_ptr<metrics::MetricsHttpServer> metrics_server_;
  Discovery discovery_;
};

TEST_F(WorkerPoolTest, AWorkerThatLeavesIsForgottenWithItsSeriesAndComesBack) {
  FakeWorker a, b, fixed;
  discovery_.Set({a.address(), b.address()});
  WorkerPoolOptions o = Options(/*forget_after_polls=*/3);
  o.workers = {fixed.address()};  // static: never forgotten
  WorkerPool pool(o, &registry_);
  EXPECT_THAT(pool.addresses(), UnorderedElementsAre(a.address(), b.address(), fixed.address()));
  EXPECT_EQ(pool.healthy_count(), 3);
  EXPECT_EQ(Healthy(b.address()), 1);

  // A blip (failed lookups) keeps the last view.
  discovery_.Set({}, /*fail=*/true);
  absl::SleepFor(absl::Milliseconds(300));  // ~10 polls
  EXPECT_EQ(pool.addresses().size(), 3u);
  EXPECT_EQ(pool.healthy_count(), 3);

  // b leaves (a pod replaced): dropped from the pool and from /metrics.
  discovery_.Set({a.address()});
  ASSERT_TRUE(WaitFor([&] { return pool.addresses().size() == 2; }));
  EXPECT_THAT(pool.addresses(), UnorderedElementsAre(a.address(), fixed.address()));
  EXPECT_EQ(Healthy(b.address()), -1);  // no series at all, not a 0
  EXPECT_EQ(Healthy(a.address()), 1);
  EXPECT_EQ(Healthy(fixed.address()), 1);
  absl::SleepFor(absl::Milliseconds(200));  // later polls neither check nor re-create it
  EXPECT_EQ(Healthy(b.address()), -1);

  // It comes back (same address): a new worker, healthy, with its series.
  discovery_.Set({a.address(), b.address()});
  ASSERT_TRUE(WaitFor([&] { return pool.healthy_count() == 3; }));
  EXPECT_THAT(pool.addresses(), UnorderedElementsAre(a.address(), b.address(), fixed.address()));
  EXPECT_EQ(Healthy(b.address()), 1);

  // Every worker gone from discovery (no records): all forgotten but the static one.
  discovery_.Set({});
  ASSERT_TRUE(WaitFor([&] { return pool.addresses().size() == 1; }));
  EXPECT_THAT(pool.addresses(), ElementsAre(fixed.address()));
  EXPECT_EQ(Healthy(a.address()), -1);
}

// The workers file (--workers_file) is a discovery source like DNS: re-read
// every poll, so editing it adds and forgets workers; a missing file or a
// bad read keeps the last view.
TEST_F(WorkerPoolTest, TheWorkersFileIsReReadEveryPoll) {
  FakeWorker a, b;
  const std::string file = absl::StrCat(::testing::TempDir(), "/pool_workers.txt");
  auto write = [&](const std::string& text) {
    const std::string tmp = file + ".tmp";
    std::ofstream(tmp) << text;
    ASSERT_EQ(std::rename(tmp.c_str(), file.c_str()), 0);  // atomic, as an operator should
  };
  write(absl::StrCat("# workers\n", a.address(), "\n\n  ", b.address(), "  \n", a.address(),
                     "\n"));
  WorkerPoolOptions o = Options(/*forget_after_polls=*/3);
  o.discover = nullptr;
  o.workers_file = file;
  WorkerPool pool(o, &registry_);
  EXPECT_THAT(pool.addresses(), UnorderedElementsAre(a.address(), b.address()));
  EXPECT_EQ(pool.healthy_count(), 2);

  std::remove(file.c_str());  // unreadable: the last view stays
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(pool.healthy_count(), 2);

  write(b.address() + "\n");  // a removed: forgotten with its series
  ASSERT_TRUE(WaitFor([&] { return pool.addresses().size() == 1; }));
  EXPECT_THAT(pool.addresses(), ElementsAre(b.address()));
  EXPECT_EQ(Healthy(a.address()), -1);
  EXPECT_EQ(Healthy(b.address()), 1);
  std::remove(file.c_str());
}

TEST_F(WorkerPoolTest, AMissingWorkerGetsNoRequestsDuringItsGrace) {
  FakeWorker a, b;
  discovery_.Set({a.address(), b.address()});
  WorkerPool pool(Options(/*forget_after_polls=*/1000), &registry_);
  discovery_.Set({a.address()});
  ASSERT_TRUE(WaitFor([&] { return pool.healthy_count() == 1; }));
  EXPECT_EQ(pool.addresses().size(), 2u);  // still known
  EXPECT_EQ(Healthy(b.address()), 0);
  for (uint64_t key = 0; key < 20; ++key) {
    auto w = pool.Acquire(key, {});
    ASSERT_TRUE(w.ok());
    EXPECT_EQ((*w)->address, a.address());
    pool.Release(w->get());
  }
  discovery_.Set({a.address(), b.address()});  // back within the grace
  ASSERT_TRUE(WaitFor([&] { return pool.healthy_count() == 2; }));
  EXPECT_EQ(Healthy(b.address()), 1);
}

TEST_F(WorkerPoolTest, AGenerationInFlightOnAForgottenWorkerFinishes) {
  FakeWorker a;
  discovery_.Set({a.address()});
  WorkerPool pool(Options(/*forget_after_polls=*/2), &registry_);
  RouterService service(&pool, &registry_, RouterOptions());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> router = builder.BuildAndStart();

  auto stub = psa::v1::Generation::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
  psa::v1::GenerateRequest request;
  request.set_text("hello");
  auto reader = stub->Generate(&ctx, request);
  psa::v1::GenerateResponse message;
  ASSERT_TRUE(reader->Read(&message));  // the first token: the call is on `a`
  ASSERT_TRUE(a.started.WaitForNotificationWithTimeout(absl::Seconds(5)));

  discovery_.Set({});  // `a` leaves while the generation runs
  ASSERT_TRUE(WaitFor([&] { return pool.addresses().empty(); }));
  EXPECT_EQ(Healthy(a.address()), -1);
  a.release.Notify();
  std::vector<uint32_t> tokens = {message.token_ids(0)};
  while (reader->Read(&message)) tokens.push_back(message.token_ids(0));
  const grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_THAT(tokens, ElementsAre(7, 8));

  // With no worker left, new requests fail cleanly.
  grpc::ClientContext ctx2;
  ctx2.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  auto reader2 = stub->Generate(&ctx2, request);
  while (reader2->Read(&message)) {
  }
  EXPECT_EQ(reader2->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  router->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
}

TEST_F(WorkerPoolTest, UnreachableWorkersAreCheckedConcurrently) {
  constexpr int kDead = 10;
  const absl::Duration deadline = absl::Milliseconds(400);
  FakeWorker alive;
  std::vector<std::unique_ptr<BlackHole>> dead;
  std::vector<std::string> answer = {alive.address()};
  for (int i = 0; i < kDead; ++i) {
    dead.push_back(std::make_unique<BlackHole>());
    answer.push_back(dead.back()->address());
  }
  discovery_.Set(answer);
  WorkerPoolOptions o = Options(/*forget_after_polls=*/3);
  o.health_interval = absl::Seconds(60);  // only the constructor's poll
  o.health_timeout = deadline;
  const absl::Time start = absl::Now();
  WorkerPool pool(o, &registry_);  // polls once before returning
  const absl::Duration took = absl::Now() - start;
  std::printf("%d unreachable + 1 live worker checked in %s (deadline %s)\n", kDead,
              absl::FormatDuration(took).c_str(), absl::FormatDuration(deadline).c_str());
  EXPECT_GE(took, deadline * 0.9);    // the dead ones did wait out their deadline
  EXPECT_LT(took, deadline * 3);      // one after another would be 10 deadlines
  EXPECT_EQ(pool.healthy_count(), 1);
  EXPECT_EQ(Healthy(alive.address()), 1);
  EXPECT_EQ(Healthy(dead[0]->address()), 0);
}

}  // namespace
}  // namespace psa
