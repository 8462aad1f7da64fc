// The KV service as deployed: real psa-kv-service processes on loopback,
// reached through KvClient or raw gRPC stubs. This file: the data path
// (writes, fetches, errors, eviction, sharding); process lifecycle and
// operations are in kv_service_lifecycle_test.cc.
#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/http_get.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kv_service/kv_client.h"
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
  // 1152 bytes of metadata per block: 3 heads x (max, min, mean) x 64 dims x fp16.
  EXPECT_EQ((*meta)[3].metadata().size(), 200u * 1152);
  EXPECT_TRUE((*meta)[3].metadata().substr(7 * 1152, 1152) ==
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

// A prefix lookup that misses is an answer, not a failed RPC; and an
// unsigned field is never wrapped (kv_head 4294967295 is not -1, "all heads").
TEST(KvServiceTest, LookupMissesAreNotErrorsAndKvHeadNeverWraps) {
  auto shard = StartShard();
  auto client = ClientFor({shard->address()});
  const psa::v1::KvLayout layout = ModelLayout();
  ASSERT_TRUE(client->Open("s", layout).ok());
  ASSERT_TRUE(client->Write("s", SequenceBlocks(layout, 1, 2, 1)).ok());
  EXPECT_EQ(client->Lease("missing", 0, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);  // to the caller, still a miss
  ASSERT_TRUE(client->Lease("s", 0, absl::Seconds(1)).ok());
  auto metric = [&](const std::string& series) {
    auto body = psa::HttpGet(shard->port("metrics_port"), "/metrics");
    return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : -1;
  };
  EXPECT_EQ(metric("psa_kv_lookups_total{result=\"miss\"}"), 1);
  EXPECT_EQ(metric("psa_kv_lookups_total{result=\"hit\"}"), 1);
  EXPECT_EQ(metric("psa_kv_rpcs_total{code=\"OK\",method=\"LeaseSequence\"}"), 2);
  EXPECT_EQ(metric("psa_kv_rpcs_total{code=\"NOT_FOUND\",method=\"LeaseSequence\"}"), 0);

  auto stub = psa::v1::KvService::NewStub(
      grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto stream = stub->FetchBlocks(&ctx);
  psa::v1::FetchBlocksRequest request;
  psa::v1::BlockQuery* q = request.add_queries();
  q->set_tag(9);
  q->set_sequence_id("s");
  q->add_block_indices(0);
  q->set_kv_head(4294967295u);
  ASSERT_TRUE(stream->Write(request));
  psa::v1::FetchBlocksResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.answers_size(), 1);
  EXPECT_EQ(response.answers(0).tag(), 9u);
  EXPECT_EQ(response.answers(0).error_code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(response.answers(0).error_message(), HasSubstr("kv_head 4294967295"));
  EXPECT_TRUE(response.answers(0).data().empty());
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
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
  // 12 KiB + 1152 B per block; 1200 KiB holds ~91 blocks: 40-block
  // sequences force evictions from the third one on.
  auto shard = StartShard({"--capacity=1200KiB"});
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

}  // namespace
}  // namespace psa
