// The KV service as deployed: real psa-kv-service processes on loopback,
// reached through KvClient or raw gRPC stubs.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "kv_service/kv_client.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "common/http_get.h"
#include "tests/support/kv_blocks.h"
#include "tests/support/server_process.h"

namespace psa {
namespace {

using psa::testing::MakeBlock;
using psa::testing::ServerProcess;
using ::testing::HasSubstr;

psa::v1::KvLayout ModelLayout() { return psa::testing::ModelShapedLayout("smollm2-135m-test"); }

std::unique_ptr<ServerProcess> StartShard(std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto p = ServerProcess::Start(PSA_KV_SERVICE_BIN, args);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

std::unique_ptr<KvClient> ClientFor(const std::vector<std::string>& shards,
                                    uint64_t max_message = 64ull << 20) {
  KvClientOptions options;
  options.shards = shards;
  options.max_message_bytes = max_message;
  options.rpc_timeout = absl::Seconds(5);
  auto client = KvClient::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(*client);
}

std::vector<psa::v1::KvBlock> SequenceBlocks(const psa::v1::KvLayout& l, uint32_t layers,
                                             uint32_t blocks, uint64_t seed) {
  std::vector<psa::v1::KvBlock> out;
  for (uint32_t layer = 0; layer < layers; ++layer) {
    for (uint32_t i = 0; i < blocks; ++i) out.push_back(MakeBlock(l, layer, i, seed));
  }
  return out;
}

TEST(KvServiceTest, RoundTripIsBitExactWithManyFetchesOutstanding) {
  auto shard = StartShard({"--max_message=1MiB"});
  auto client = ClientFor({shard->address()}, 1 << 20);
  const psa::v1::KvLayout layout = ModelLayout();
  auto opened = client->Open("doc", layout);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_TRUE(opened->created());

  // 4 layers x 200 blocks = 9.8 MB: many messages under the 1 MiB limit.
  const auto blocks = SequenceBlocks(layout, 4, 200, 42);
  auto written = client->Write("doc", blocks);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(written->blocks_written(), blocks.size());

  std::mt19937 rng(1);
  std::atomic<int> wrong{0}, failed{0};
  std::atomic<int> remaining{500};
  absl::Notification all_done;
  for (int r = 0; r < 500; ++r) {
    const uint32_t layer = rng() % 4;
    std::vector<uint32_t> indices;
    for (int k = 0; k < 16; ++k) indices.push_back(rng() % 200);
    absl::Status s = client->FetchAsync(
        "doc", layer, indices, absl::Now() + absl::Seconds(20),
        [&, layer, indices](absl::Status status, FetchedBlocks got) {
          if (!status.ok()) {
            ++failed;
          } else {
            for (size_t k = 0; k < indices.size(); ++k) {
              if (got.Block(k) != MakeBlock(layout, layer, indices[k], 42).data()) {
                ++wrong;
              }
            }
          }
          if (--remaining == 0) all_done.Notify();
        });
    ASSERT_TRUE(s.ok()) << s;
  }
  ASSERT_TRUE(all_done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(failed.load(), 0);

  auto meta = client->ReadMetadata("doc");
  ASSERT_TRUE(meta.ok()) << meta.status();
  ASSERT_EQ(meta->size(), 30u);
  EXPECT_EQ((*meta)[3].num_blocks(), 200u);
  EXPECT_EQ((*meta)[4].num_blocks(), 0u);
  // 768 bytes of metadata per block: 3 heads x (max, min) x 64 dims x fp16.
  EXPECT_EQ((*meta)[3].metadata().size(), 200u * 768);
  EXPECT_TRUE((*meta)[3].metadata().substr(7 * 768, 768) ==
              MakeBlock(layout, 3, 7, 42).metadata());

  // Reopening reports what is stored; a different layout is refused.
  opened = client->Open("doc", layout);
  ASSERT_TRUE(opened.ok());
  EXPECT_FALSE(opened->created());
  EXPECT_EQ(opened->blocks_per_layer(0), 200u);
  psa::v1::KvLayout other = layout;
  other.set_model_id("other-weights");
  EXPECT_EQ(client->Open("doc", other).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(KvServiceTest, PerHeadFetchReturnsThatHeadsPartOfEachBlock) {
  auto shard = StartShard({});
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("doc", layout).ok());
  ASSERT_TRUE(client->Write("doc", SequenceBlocks(layout, 2, 10, 5)).ok());
  const size_t block = 2ull * layout.num_kv_heads() * layout.block_size() * layout.head_dim() * 2;
  const size_t page = block / layout.num_kv_heads();
  for (int head = 0; head < static_cast<int>(layout.num_kv_heads()); ++head) {
    absl::Notification done;
    absl::Status status;
    std::string got;
    uint32_t page_bytes = 0;
    ASSERT_TRUE(client
                    ->FetchAsync("doc", 1, {7, 2}, absl::Now() + absl::Seconds(10),
                                 [&](absl::Status s, FetchedBlocks blocks) {
                                   status = s;
                                   got = blocks.ToString();
                                   page_bytes = blocks.block_bytes();
                                   done.Notify();
                                 },
                                 head)
                    .ok());
    done.WaitForNotification();
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(page_bytes, page);
    const std::string b7 = MakeBlock(layout, 1, 7, 5).data(), b2 = MakeBlock(layout, 1, 2, 5).data();
    EXPECT_TRUE(got == b7.substr(head * page, page) + b2.substr(head * page, page)) << head;
  }
  absl::Notification done;
  absl::Status status;
  ASSERT_TRUE(client
                  ->FetchAsync("doc", 1, {0}, absl::Now() + absl::Seconds(10),
                               [&](absl::Status s, FetchedBlocks) {
                                 status = s;
                                 done.Notify();
                               },
                               /*kv_head=*/3)
                  .ok());
  done.WaitForNotification();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "kv_head 3")) << status;
}

TEST(KvServiceTest, BadInputsGetClearErrorsAndChangeNothing) {
  auto shard = StartShard({"--max_message=1MiB"});
  auto channel = grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials());
  auto stub = psa::v1::KvService::NewStub(channel);
  auto client = ClientFor({shard->address()}, 1 << 20);
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 3, 1)).ok());
  const psa::v1::KvStats before = *client->Stats(shard->address());

  auto call_open = [&](const psa::v1::OpenSequenceRequest& req) {
    grpc::ClientContext ctx;
    psa::v1::OpenSequenceResponse resp;
    return stub->OpenSequence(&ctx, req, &resp);
  };
  psa::v1::OpenSequenceRequest open;
  open.set_sequence_id("t");
  grpc::Status s = call_open(open);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("layout is missing"));
  *open.mutable_layout() = layout;
  open.mutable_layout()->set_block_size(0);
  s = call_open(open);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("block_size"));

  auto write = [&](const std::string& id, std::vector<psa::v1::KvBlock> blocks) {
    return client->Write(id, blocks).status();
  };
  auto wrong_shape = MakeBlock(layout, 0, 3, 1);
  wrong_shape.mutable_data()->resize(100);
  absl::Status w = write("s", {wrong_shape});
  EXPECT_EQ(w.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(w.message(), HasSubstr("data is 100 bytes"));
  EXPECT_EQ(write("unknown", {MakeBlock(layout, 0, 0, 1)}).code(), absl::StatusCode::kNotFound);
  w = write("s", {MakeBlock(layout, 0, 5, 1)});
  EXPECT_EQ(w.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(w.message(), HasSubstr("next block must be index 3"));
  EXPECT_EQ(write("s", {MakeBlock(layout, 0, 1, 2)}).code(),
            absl::StatusCode::kFailedPrecondition);  // different content
  EXPECT_TRUE(write("s", {MakeBlock(layout, 0, 1, 1)}).ok());  // identical: fine

  {  // A message over the server's limit.
    grpc::ClientContext ctx;
    psa::v1::WriteBlocksResponse resp;
    auto writer = stub->WriteBlocks(&ctx, &resp);
    psa::v1::WriteBlocksRequest req;
    req.set_sequence_id("s");
    for (uint32_t i = 3; i < 3 + 100; ++i) *req.add_blocks() = MakeBlock(layout, 0, i, 1);
    writer->Write(req);
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }

  // Fetch errors come back per request; the stream keeps serving.
  EXPECT_EQ(client->Fetch("unknown", 0, {0}, absl::Seconds(5)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->Fetch("s", 0, {7}, absl::Seconds(5)).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(client->Fetch("s", 31, {0}, absl::Seconds(5)).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint32_t> too_many(100, 0);
  EXPECT_EQ(client->Fetch("s", 0, too_many, absl::Seconds(5)).status().code(),
            absl::StatusCode::kResourceExhausted);
  auto ok = client->Fetch("s", 0, {2}, absl::Seconds(5));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->ToString() == MakeBlock(layout, 0, 2, 1).data());

  EXPECT_EQ(client->ReadMetadata("unknown").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client->Lease("unknown", 0, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->Lease("s", 12345, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->Release("unknown").status().code(), absl::StatusCode::kNotFound);

  const psa::v1::KvStats after = *client->Stats(shard->address());
  EXPECT_EQ(after.blocks(), before.blocks());
  EXPECT_EQ(after.bytes_stored(), before.bytes_stored());
  EXPECT_EQ(after.sequences(), before.sequences());
}

TEST(KvServiceTest, ConcurrentWritersAndReaders) {
  auto shard = StartShard();
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  constexpr int kSeqs = 4;
  constexpr uint32_t kBlocks = 60;
  std::atomic<int> errors{0}, wrong{0}, reads{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kSeqs; ++t) {
    const std::string id = absl::StrCat("seq", t);
    ASSERT_TRUE(client->Open(id, layout).ok());
    threads.emplace_back([&, id, t] {  // writer: one block per message
      for (uint32_t i = 0; i < kBlocks; ++i) {
        if (!client->Write(id, {MakeBlock(layout, 0, i, t)}).ok()) ++errors;
      }
    });
    threads.emplace_back([&, id, t] {  // reader: the newest block it can see
      for (int n = 0; n < 60; ++n) {
        auto meta = client->ReadMetadata(id);
        if (!meta.ok()) {
          ++errors;
          continue;
        }
        const uint32_t have = (*meta)[0].num_blocks();
        if (have == 0) continue;
        auto got = client->Fetch(id, 0, {have - 1}, absl::Seconds(10));
        ++reads;
        if (!got.ok()) {
          ++errors;
        } else if (got->ToString() != MakeBlock(layout, 0, have - 1, t).data()) {
          ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(reads.load(), 0);
  EXPECT_EQ(client->Stats(shard->address())->blocks(), kSeqs * kBlocks);
}

TEST(KvServiceTest, EvictionUnderPressureNeverTakesALeasedSequence) {
  // 12 KiB + 384 B per block; 1 MiB holds ~84 blocks: 40-block sequences
  // force evictions from the third one on.
  auto shard = StartShard({"--capacity=1MiB"});
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("pinned", layout).ok());
  ASSERT_TRUE(client->Write("pinned", SequenceBlocks(layout, 1, 40, 0)).ok());
  auto lease = client->Lease("pinned", 0, absl::Minutes(5));
  ASSERT_TRUE(lease.ok()) << lease.status();
  for (int i = 1; i <= 6; ++i) {
    const std::string id = absl::StrCat("other", i);
    ASSERT_TRUE(client->Open(id, layout).ok());
    auto w = client->Write(id, SequenceBlocks(layout, 1, 40, i));
    ASSERT_TRUE(w.ok()) << w.status();
    auto pinned = client->Fetch("pinned", 0, {0, 39}, absl::Seconds(5));
    ASSERT_TRUE(pinned.ok()) << "leased sequence lost after writing " << id;
  }
  const psa::v1::KvStats stats = *client->Stats(shard->address());
  EXPECT_GE(stats.evictions(), 5u);
  EXPECT_LE(stats.bytes_stored(), stats.capacity_bytes());
  EXPECT_EQ(client->Fetch("other1", 0, {0}, absl::Seconds(5)).status().code(),
            absl::StatusCode::kNotFound);

  // With the lease ended, the pinned sequence is evictable like any other.
  ASSERT_TRUE(client->Lease("pinned", lease->lease_id(), absl::ZeroDuration()).ok());
  ASSERT_TRUE(client->Open("other7", layout).ok());
  ASSERT_TRUE(client->Write("other7", SequenceBlocks(layout, 1, 40, 7)).ok());
  ASSERT_TRUE(client->Open("other8", layout).ok());
  ASSERT_TRUE(client->Write("other8", SequenceBlocks(layout, 1, 40, 8)).ok());
  EXPECT_EQ(client->Fetch("pinned", 0, {0}, absl::Seconds(5)).status().code(),
            absl::StatusCode::kNotFound);
}

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

TEST(KvServiceTest, ShardsAcrossThreeInstancesByConsistentHashing) {
  std::vector<std::unique_ptr<ServerProcess>> shards;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    shards.push_back(StartShard());
    addresses.push_back(shards.back()->address());
  }
  auto client = ClientFor(addresses);
  const psa::v1::KvLayout layout = ModelLayout();
  std::map<std::string, int> expected;
  for (int s = 0; s < 30; ++s) {
    const std::string id = absl::StrCat("conversation-", s);
    ++expected[client->ShardFor(id)];
    ASSERT_TRUE(client->Open(id, layout).ok());
    ASSERT_TRUE(client->Write(id, SequenceBlocks(layout, 2, 3, s)).ok());
  }
  for (const std::string& a : addresses) {
    auto stats = client->Stats(a);
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->sequences(), uint64_t(expected[a])) << a;
    EXPECT_GT(stats->sequences(), 0u) << a;
  }
  for (int s = 0; s < 30; ++s) {
    auto got = client->Fetch(absl::StrCat("conversation-", s), 1, {2}, absl::Seconds(5));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(got->ToString() == MakeBlock(layout, 1, 2, s).data());
  }
  // Ids sharing a placement key ("key/...") share a shard, so links work.
  ASSERT_TRUE(client->Open("conversation-3/full", layout).ok());
  ASSERT_TRUE(client->Write("conversation-3/full", SequenceBlocks(layout, 30, 4, 77)).ok());
  EXPECT_EQ(client->ShardFor("conversation-3/full"), client->ShardFor("conversation-3"));
  auto linked = client->OpenLinked("conversation-3/head", layout, "conversation-3/full", 2);
  ASSERT_TRUE(linked.ok()) << linked.status();
  EXPECT_EQ(linked->blocks_per_layer(29), 2u);
  auto got = client->Fetch("conversation-3/head", 29, {1}, absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->ToString() == MakeBlock(layout, 29, 1, 77).data());
  // A second client with the same shard list agrees on placement.
  auto other = ClientFor({addresses[2], addresses[0], addresses[1]});
  for (int s = 0; s < 30; ++s) {
    const std::string id = absl::StrCat("conversation-", s);
    EXPECT_EQ(other->ShardFor(id), client->ShardFor(id));
  }
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
