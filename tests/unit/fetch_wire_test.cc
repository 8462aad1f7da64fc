#include "kv_service/fetch_wire.h"

#include <random>

#include "gtest/gtest.h"
#include "tests/support/kv_blocks.h"

namespace psa {
namespace {

std::string Flatten(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(b.Dump(&slices).ok());
  std::string s;
  for (const auto& slice : slices) s.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return s;
}

// The same bytes cut into slices of random sizes, as a socket might deliver.
grpc::ByteBuffer Resplit(const std::string& bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<grpc::Slice> slices;
  for (size_t pos = 0; pos < bytes.size();) {
    const size_t n = std::min<size_t>(bytes.size() - pos, 1 + rng() % 5000);
    slices.emplace_back(bytes.data() + pos, n);
    pos += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::vector<std::shared_ptr<const std::string>> Blocks(int n, uint64_t seed) {
  std::vector<std::shared_ptr<const std::string>> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(std::make_shared<const std::string>(psa::testing::PatternBytes(seed + i, 12288)));
  }
  return out;
}

TEST(FetchWireTest, AnswersRoundTripAcrossAnySliceBoundaries) {
  const auto a = Blocks(5, 1), b = Blocks(1, 100);
  std::vector<EncodedAnswer> answers;
  answers.push_back(EncodeAnswer(7, a));
  answers.push_back(EncodeErrorAnswer(8, absl::NotFoundError("no such sequence")));
  answers.push_back(EncodeAnswer(9, b));
  answers.push_back(EncodeAnswer(10, {}));
  const std::string wire = Flatten(PackAnswers(std::move(answers)));

  // Any protobuf reader sees a normal FetchBlocksResponse.
  psa::v1::FetchBlocksResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  ASSERT_EQ(parsed.answers_size(), 4);
  EXPECT_EQ(parsed.answers(0).tag(), 7u);
  EXPECT_EQ(parsed.answers(0).block_bytes(), 12288u);
  EXPECT_EQ(parsed.answers(0).data().substr(2 * 12288, 12288), *a[2]);
  EXPECT_EQ(parsed.answers(1).error_code(), static_cast<int>(absl::StatusCode::kNotFound));

  for (uint32_t seed = 0; seed < 20; ++seed) {
    std::vector<DecodedAnswer> decoded;
    ASSERT_TRUE(FetchResponseDecoder::Decode(Resplit(wire, seed), &decoded).ok());
    ASSERT_EQ(decoded.size(), 4u);
    EXPECT_EQ(decoded[0].tag, 7u);
    ASSERT_EQ(decoded[0].blocks.size(), 5u);
    for (int k = 0; k < 5; ++k) EXPECT_TRUE(decoded[0].blocks.Block(k) == *a[k]);
    std::string two(2 * 12288, '\0');
    decoded[0].blocks.CopyTo(3, 2, two.data());
    EXPECT_TRUE(two == *a[3] + *a[4]);
    EXPECT_EQ(decoded[1].tag, 8u);
    EXPECT_EQ(decoded[1].status.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(decoded[1].status.message(), "no such sequence");
    EXPECT_EQ(decoded[1].blocks.size(), 0u);
    EXPECT_TRUE(decoded[2].blocks.ToString() == *b[0]);
    EXPECT_TRUE(decoded[3].status.ok());
    EXPECT_EQ(decoded[3].blocks.size(), 0u);
  }
}

TEST(FetchWireTest, ReadsWhatAProtobufWriterProduces) {
  psa::v1::FetchBlocksResponse r;
  auto* a = r.add_answers();
  a->set_tag(3);
  a->set_block_bytes(4);
  a->set_data("abcdefgh");
  grpc::Slice slice(r.SerializeAsString());
  std::vector<DecodedAnswer> decoded;
  ASSERT_TRUE(FetchResponseDecoder::Decode(grpc::ByteBuffer(&slice, 1), &decoded).ok());
  ASSERT_EQ(decoded.size(), 1u);
  EXPECT_EQ(decoded[0].blocks.Block(1), "efgh");
}

TEST(FetchWireTest, MalformedMessagesAreRefused) {
  std::vector<EncodedAnswer> answers;
  answers.push_back(EncodeAnswer(7, Blocks(2, 1)));
  const std::string wire = Flatten(PackAnswers(std::move(answers)));
  for (size_t cut : {size_t{1}, size_t{3}, wire.size() / 2, wire.size() - 1}) {
    std::vector<DecodedAnswer> decoded;
    EXPECT_EQ(FetchResponseDecoder::Decode(Resplit(wire.substr(0, cut), 1), &decoded).code(),
              absl::StatusCode::kInternal)
        << cut;
  }
  psa::v1::FetchBlocksResponse r;  // data not a whole number of blocks
  r.add_answers()->set_data("abcde");
  r.mutable_answers(0)->set_block_bytes(2);
  grpc::Slice slice(r.SerializeAsString());
  std::vector<DecodedAnswer> decoded;
  EXPECT_EQ(FetchResponseDecoder::Decode(grpc::ByteBuffer(&slice, 1), &decoded).code(),
            absl::StatusCode::kInternal);
}

TEST(FetchWireTest, QueriesPackIntoOneRequest) {
  std::vector<psa::v1::BlockQuery> queries(3);
  for (int i = 0; i < 3; ++i) {
    queries[i].set_tag(i + 1);
    queries[i].set_sequence_id("s");
    queries[i].add_block_indices(i);
  }
  grpc::ByteBuffer packed = PackQueries(queries);
  psa::v1::FetchBlocksRequest request;
  ASSERT_TRUE(DecodeFetchRequest(&packed, &request).ok());
  ASSERT_EQ(request.queries_size(), 3);
  EXPECT_EQ(request.queries(2).block_indices(0), 2u);
  grpc::Slice junk(std::string("\xff\xff\xff", 3));
  grpc::ByteBuffer bad(&junk, 1);
  EXPECT_EQ(DecodeFetchRequest(&bad, &request).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace psa
