// The FetchBlocks stream's messages as raw gRPC byte buffers, so that block
// bytes go from the server's store to the socket, and from the client's
// receive buffers to their destination, without intermediate copies.
//
// What these functions produce is exactly the protobuf wire form of
// psa.v1.FetchBlocksResponse / FetchBlocksRequest; any protobuf peer can
// read it. Only the data fields are special: on the server their bytes are
// the stored blocks themselves, referenced by slices that keep them alive
// until sent; on the client they stay in the received slices.
#ifndef PSA_KV_SERVICE_FETCH_WIRE_H_
#define PSA_KV_SERVICE_FETCH_WIRE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "proto/psa/v1/kv_service.pb.h"

namespace psa {

// ---- Server side ----

// One BlockAnswer, encoded (without its enclosing field header).
struct EncodedAnswer {
  std::vector<grpc::Slice> slices;
  uint64_t bytes = 0;
};

// Carries bytes [offset, offset + length) of each block (length 0: all).
EncodedAnswer EncodeAnswer(uint64_t tag,
                           const std::vector<std::shared_ptr<const std::string>>& blocks,
                           uint64_t offset = 0, uint64_t length = 0);
// An answer carrying `status` (not OK) for query `tag`.
EncodedAnswer EncodeErrorAnswer(uint64_t tag, const absl::Status& status);

// One FetchBlocksResponse holding `answers`, in order.
grpc::ByteBuffer PackAnswers(std::vector<EncodedAnswer> answers);

absl::Status DecodeFetchRequest(grpc::ByteBuffer* buffer, psa::v1::FetchBlocksRequest* request);

// ---- Client side ----

// The blocks of one answer, left in the buffers gRPC received them into:
// reading them costs one copy, straight to where they are needed.
class FetchedBlocks {
 public:
  size_t size() const { return count_; }  // number of blocks
  uint32_t block_bytes() const { return block_bytes_; }
  // Copies blocks [first, first + n) to `dst` (n * block_bytes() bytes).
  void CopyTo(size_t first, size_t n, char* dst) const;
  // Copies `n` bytes from `offset` of the concatenated blocks to `dst`.
  void CopyBytes(uint64_t offset, uint64_t n, char* dst) const;
  std::string Block(size_t k) const;
  std::string ToString() const;  // all blocks, concatenated

 private:
  friend class FetchResponseDecoder;
  struct Message {
    std::vector<grpc::Slice> slices;
    std::vector<uint64_t> starts;  // offset of each slice in the message
  };
  std::shared_ptr<const Message> message_;  // shared by a message's answers
  uint64_t data_offset_ = 0;
  size_t count_ = 0;
  uint32_t block_bytes_ = 0;
};

struct DecodedAnswer {
  uint64_t tag = 0;
  absl::Status status;   // the server's verdict on the query
  FetchedBlocks blocks;  // empty unless status is OK
};

class FetchResponseDecoder {
 public:
  // Splits a FetchBlocksResponse into its answers; INTERNAL if malformed.
  static absl::Status Decode(const grpc::ByteBuffer& buffer, std::vector<DecodedAnswer>* out);
};

// One FetchBlocksRequest holding `queries`.
grpc::ByteBuffer PackQueries(const std::vector<psa::v1::BlockQuery>& queries);

}  // namespace psa

#endif  // PSA_KV_SERVICE_FETCH_WIRE_H_
