#include "kv_service/block_store.h"

#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/kv_blocks.h"

namespace psa {
namespace {

using psa::testing::MakeBlock;
using psa::testing::SmallLayout;
using ::testing::HasSubstr;

constexpr uint64_t kNoLimit = ~0ull;

BlockWrite View(const psa::v1::KvBlock& b) {
  return BlockWrite{b.layer(), b.index(), b.data(), b.metadata()};
}

class BlockStoreTest : public ::testing::Test {
 protected:
  BlockStoreTest() : store_(BlockStore::Options{1 << 20}) {}

  void OpenSeq(const std::string& id, BlockStore* store = nullptr) {
    bool created;
    std::vector<uint32_t> counts;
    ASSERT_TRUE((store ? store : &store_)->Open(id, layout_, &created, &counts).ok());
  }
  // Writes blocks [0, n) of both layers with content `seed`.
  absl::StatusOr<WriteResult> WriteAll(const std::string& id, uint32_t n, uint64_t seed,
                                       BlockStore* store = nullptr) {
    std::vector<psa::v1::KvBlock> blocks;
    for (uint32_t l = 0; l < 2; ++l) {
      for (uint32_t i = 0; i < n; ++i) blocks.push_back(MakeBlock(layout_, l, i, seed));
    }
    std::vector<BlockWrite> views;
    for (const auto& b : blocks) views.push_back(View(b));
    return (store ? store : &store_)->Write(id, views);
  }

  psa::v1::KvLayout layout_ = SmallLayout();
  BlockStore store_;
};

TEST_F(BlockStoreTest, RoundTripIsBitExactInRequestedOrder) {
  OpenSeq("s");
  ASSERT_TRUE(WriteAll("s", 5, 7).ok());
  std::string out;
  uint64_t block_bytes = 0;
  const std::vector<uint32_t> order = {4, 0, 2, 2};
  ASSERT_TRUE(store_.Read("s", 1, order, kNoLimit, &out, &block_bytes).ok());
  ASSERT_EQ(block_bytes, 256u);
  ASSERT_EQ(out.size(), 4 * 256u);
  for (size_t k = 0; k < order.size(); ++k) {
    EXPECT_EQ(out.substr(k * 256, 256), MakeBlock(layout_, 1, order[k], 7).data());
  }
  std::vector<std::string> meta;
  std::vector<uint32_t> counts;
  ASSERT_TRUE(store_.ReadMetadata("s", &meta, &counts).ok());
  EXPECT_THAT(counts, ::testing::ElementsAre(5, 5));
  EXPECT_EQ(meta[0].substr(3 * 96, 96), MakeBlock(layout_, 0, 3, 7).metadata());
}

TEST_F(BlockStoreTest, OpenChecksLayout) {
  OpenSeq("s");
  bool created = true;
  std::vector<uint32_t> counts;
  ASSERT_TRUE(WriteAll("s", 2, 1).ok());
  ASSERT_TRUE(store_.Open("s", layout_, &created, &counts).ok());
  EXPECT_FALSE(created);
  EXPECT_THAT(counts, ::testing::ElementsAre(2, 2));

  psa::v1::KvLayout other = layout_;
  other.set_head_dim(16);
  absl::Status s = store_.Open("s", other, &created, &counts);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("head_dim=8"));

  psa::v1::KvLayout bad = layout_;
  bad.set_dtype(psa::v1::KV_DTYPE_UNSPECIFIED);
  EXPECT_EQ(store_.Open("t", bad, &created, &counts).code(),
            absl::StatusCode::kInvalidArgument);
  bad = layout_;
  bad.set_num_layers(0);
  EXPECT_THAT(store_.Open("t", bad, &created, &counts).message(), HasSubstr("num_layers"));
  EXPECT_EQ(store_.Open("", layout_, &created, &counts).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_.Stats().sequences, 1u);
}

TEST_F(BlockStoreTest, BadWritesChangeNothing) {
  OpenSeq("s");
  ASSERT_TRUE(WriteAll("s", 2, 1).ok());
  const BlockStoreStats before = store_.Stats();

  auto good = MakeBlock(layout_, 0, 2, 1);
  auto gap = MakeBlock(layout_, 0, 4, 1);
  absl::Status s = store_.Write("s", {View(good), View(gap)}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("next block must be index 3"));

  auto short_data = MakeBlock(layout_, 0, 2, 1);
  short_data.mutable_data()->pop_back();
  s = store_.Write("s", {View(short_data)}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("needs 256 and 96"));

  auto bad_layer = MakeBlock(layout_, 0, 2, 1);
  bad_layer.set_layer(2);
  EXPECT_EQ(store_.Write("s", {View(good), View(bad_layer)}).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto changed = MakeBlock(layout_, 1, 0, 99);  // index 0 holds seed-1 content
  s = store_.Write("s", {View(good), View(changed)}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("immutable"));

  EXPECT_EQ(store_.Write("s", {View(good), View(good)}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.Write("nope", {View(good)}).status().code(), absl::StatusCode::kNotFound);

  const BlockStoreStats after = store_.Stats();
  EXPECT_EQ(after.blocks, before.blocks);
  EXPECT_EQ(after.bytes_stored, before.bytes_stored);
  std::vector<std::string> meta;
  std::vector<uint32_t> counts;
  ASSERT_TRUE(store_.ReadMetadata("s", &meta, &counts).ok());
  EXPECT_THAT(counts, ::testing::ElementsAre(2, 2));
}

TEST_F(BlockStoreTest, IdenticalRewriteIsIgnoredAndOutOfOrderMessageIsAccepted) {
  OpenSeq("s");
  ASSERT_TRUE(WriteAll("s", 2, 1).ok());
  auto b3 = MakeBlock(layout_, 0, 3, 1), b2 = MakeBlock(layout_, 0, 2, 1),
       b0 = MakeBlock(layout_, 0, 0, 1);
  absl::StatusOr<WriteResult> r = store_.Write("s", {View(b3), View(b0), View(b2)});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->written, 2u);
  EXPECT_EQ(r->unchanged, 1u);
}

TEST_F(BlockStoreTest, IdenticalBlocksAreStoredOnceAndFreedWithTheLastReference) {
  OpenSeq("a");
  OpenSeq("b");
  ASSERT_TRUE(WriteAll("a", 3, 5).ok());
  absl::StatusOr<WriteResult> r = WriteAll("b", 3, 5);  // same prefix content
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->shared, 6u);
  BlockStoreStats s = store_.Stats();
  EXPECT_EQ(s.blocks, 12u);
  EXPECT_EQ(s.unique_blocks, 6u);
  EXPECT_EQ(s.bytes_stored, 6u * (256 + 96));
  EXPECT_EQ(*store_.Release("a"), 0u);  // still referenced by b
  EXPECT_EQ(store_.Stats().bytes_stored, 6u * (256 + 96));
  std::string out;
  uint64_t bb;
  ASSERT_TRUE(store_.Read("b", 0, {2}, kNoLimit, &out, &bb).ok());
  EXPECT_EQ(out, MakeBlock(layout_, 0, 2, 5).data());
  EXPECT_EQ(*store_.Release("b"), 6u * (256 + 96));
  EXPECT_EQ(store_.Stats().bytes_stored, 0u);
  EXPECT_EQ(store_.Release("b").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(BlockStoreTest, EvictsLeastRecentlyUsedButNeverLeased) {
  // Room for 3 sequences of 2x2 blocks (1408 bytes each).
  BlockStore store(BlockStore::Options{3 * 1408});
  for (const char* id : {"old", "leased", "mid"}) {
    OpenSeq(id, &store);
    ASSERT_TRUE(WriteAll(id, 2, id[0], &store).ok());
  }
  ASSERT_TRUE(store.Lease("leased", 0, absl::Minutes(1)).ok());
  std::string out;
  uint64_t bb;
  ASSERT_TRUE(store.Read("old", 0, {0}, kNoLimit, &out, &bb).ok());  // old is now recent

  OpenSeq("new", &store);
  ASSERT_TRUE(WriteAll("new", 2, 'n', &store).ok());
  EXPECT_EQ(store.Read("mid", 0, {0}, kNoLimit, &out, &bb).code(),
            absl::StatusCode::kNotFound);  // the LRU unleased one went
  EXPECT_TRUE(store.Read("leased", 0, {0}, kNoLimit, &out, &bb).ok());
  EXPECT_TRUE(store.Read("old", 0, {0}, kNoLimit, &out, &bb).ok());
  EXPECT_EQ(store.Stats().evictions, 1u);

  // Everything else leased: a write that does not fit is refused, no eviction.
  ASSERT_TRUE(store.Lease("old", 0, absl::Minutes(1)).ok());
  ASSERT_TRUE(store.Lease("new", 0, absl::Minutes(1)).ok());
  OpenSeq("big", &store);
  absl::Status s = WriteAll("big", 2, 'b', &store).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("--capacity"));
  EXPECT_EQ(store.Stats().evictions, 1u);
  EXPECT_EQ(store.Stats().sequences, 4u);
}

absl::Time fake_now = absl::UnixEpoch();
absl::Time FakeNow() { return fake_now; }

TEST_F(BlockStoreTest, LeasesExpireRenewAndEnd) {
  BlockStore store(BlockStore::Options{2 * 1408, &FakeNow});
  OpenSeq("a", &store);
  ASSERT_TRUE(WriteAll("a", 2, 1, &store).ok());
  absl::StatusOr<LeaseResult> lease = store.Lease("a", 0, absl::Seconds(10));
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(store.Stats().leases, 1u);
  fake_now += absl::Seconds(5);
  ASSERT_TRUE(store.Lease("a", lease->lease_id, absl::Seconds(10)).ok());  // renew
  fake_now += absl::Seconds(9);
  EXPECT_EQ(store.Stats().leases, 1u);
  fake_now += absl::Seconds(2);
  EXPECT_EQ(store.Stats().leases, 0u);  // expired
  EXPECT_EQ(store.Lease("a", lease->lease_id, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);
  lease = store.Lease("a", 0, absl::Seconds(10));
  ASSERT_TRUE(store.Lease("a", lease->lease_id, absl::ZeroDuration()).ok());  // end
  EXPECT_EQ(store.Stats().leases, 0u);
  EXPECT_EQ(store.Lease("zz", 0, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(BlockStoreTest, ReadErrors) {
  OpenSeq("s");
  ASSERT_TRUE(WriteAll("s", 3, 1).ok());
  std::string out;
  uint64_t bb;
  EXPECT_EQ(store_.Read("s", 0, {3}, kNoLimit, &out, &bb).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(store_.Read("s", 2, {0}, kNoLimit, &out, &bb).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_.Read("x", 0, {0}, kNoLimit, &out, &bb).code(), absl::StatusCode::kNotFound);
  absl::Status s = store_.Read("s", 0, {0, 1, 2}, 600, &out, &bb);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("at most 2"));
  EXPECT_TRUE(out.empty());
}

TEST_F(BlockStoreTest, ConcurrentWritersAndReadersSeeOnlyWholeBlocks) {
  constexpr int kSeqs = 4, kBlocks = 40;
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < kSeqs; ++t) {
    const std::string id = "seq" + std::to_string(t);
    OpenSeq(id);
    threads.emplace_back([&, id, t] {
      for (uint32_t i = 0; i < kBlocks; ++i) {
        auto b = MakeBlock(layout_, 0, i, t);
        if (!store_.Write(id, {View(b)}).ok()) ++bad;
      }
    });
    threads.emplace_back([&, id, t] {
      for (int n = 0; n < 400; ++n) {
        std::vector<std::string> meta;
        std::vector<uint32_t> counts;
        if (!store_.ReadMetadata(id, &meta, &counts).ok()) ++bad;
        if (counts[0] == 0) continue;
        const uint32_t i = counts[0] - 1;
        std::string out;
        uint64_t bb;
        if (!store_.Read(id, 0, {i}, kNoLimit, &out, &bb).ok() ||
            out != MakeBlock(layout_, 0, i, t).data()) {
          ++bad;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(store_.Stats().blocks, uint64_t{kSeqs * kBlocks});
}

TEST_F(BlockStoreTest, LinkedSequencesShareAPrefixByReference) {
  OpenSeq("doc");
  ASSERT_TRUE(WriteAll("doc", 5, 3).ok());
  const uint64_t bytes = store_.Stats().bytes_stored;
  bool created = false;
  std::vector<uint32_t> counts;
  ASSERT_TRUE(store_.OpenLinked("doc/3", layout_, "doc", 3, &created, &counts).ok());
  EXPECT_TRUE(created);
  EXPECT_THAT(counts, ::testing::ElementsAre(3, 3));
  EXPECT_EQ(store_.Stats().bytes_stored, bytes);  // nothing copied
  EXPECT_EQ(store_.Stats().blocks, 16u);
  std::string out;
  uint64_t bb;
  ASSERT_TRUE(store_.Read("doc/3", 1, {2}, kNoLimit, &out, &bb).ok());
  EXPECT_EQ(out, MakeBlock(layout_, 1, 2, 3).data());
  EXPECT_EQ(store_.Read("doc/3", 1, {3}, kNoLimit, &out, &bb).code(),
            absl::StatusCode::kOutOfRange);
  // The link outlives its source; it can grow on its own.
  ASSERT_TRUE(store_.Release("doc").ok());
  EXPECT_EQ(store_.Stats().bytes_stored, 6u * (256 + 96));
  auto b3 = MakeBlock(layout_, 0, 3, 9);
  EXPECT_TRUE(store_.Write("doc/3", {View(b3)}).ok());
  // Opening an existing link again changes nothing.
  ASSERT_TRUE(store_.OpenLinked("doc/3", layout_, "gone", 1, &created, &counts).ok());
  EXPECT_FALSE(created);
  EXPECT_THAT(counts, ::testing::ElementsAre(4, 3));
  // Errors.
  EXPECT_EQ(store_.OpenLinked("x", layout_, "gone", 1, &created, &counts).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_.OpenLinked("x", layout_, "doc/3", 5, &created, &counts).code(),
            absl::StatusCode::kOutOfRange);
  psa::v1::KvLayout other = layout_;
  other.set_model_id("other");
  EXPECT_EQ(store_.OpenLinked("x", other, "doc/3", 1, &created, &counts).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.Stats().sequences, 1u);
}

}  // namespace
}  // namespace psa
