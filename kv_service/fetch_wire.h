// The FetchBlocks stream's messages as raw gRPC byte buffers, so that the
// server sends block bytes straight from the store without copying them.
//
// EncodeFetchBlocks produces exactly the protobuf wire form of a
// psa.v1.FetchBlocksResponse (tag, block_bytes, data): any protobuf client
// parses it. Only the data field is special: its bytes are the stored blocks
// themselves, referenced by slices that keep them alive until sent.
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

grpc::ByteBuffer EncodeFetchBlocks(uint64_t tag,
                                   const std::vector<std::shared_ptr<const std::string>>& blocks);

// A response carrying `status` (not OK) for request `tag`.
grpc::ByteBuffer EncodeFetchError(uint64_t tag, const absl::Status& status);

absl::Status DecodeFetchRequest(grpc::ByteBuffer* buffer, psa::v1::FetchBlocksRequest* request);

// The blocks of one fetch answer, left in the buffers gRPC received them
// into: reading them costs one copy, straight to where they are needed.
class FetchedBlocks {
 public:
  size_t size() const { return count_; }  // number of blocks
  uint32_t block_bytes() const { return block_bytes_; }
  // Copies blocks [first, first + n) to `dst` (n * block_bytes() bytes).
  void CopyTo(size_t first, size_t n, char* dst) const;
  std::string Block(size_t k) const;
  std::string ToString() const;  // all blocks, concatenated

 private:
  friend absl::Status DecodeFetchResponse(const grpc::ByteBuffer&, uint64_t*, FetchedBlocks*);
  std::vector<grpc::Slice> slices_;
  std::vector<uint64_t> slice_starts_;  // offset of each slice in the message
  uint64_t data_offset_ = 0;
  size_t count_ = 0;
  uint32_t block_bytes_ = 0;
};

// Reads the tag of a FetchBlocksResponse and either its blocks (OK) or the
// error it carries. A malformed message gives INTERNAL with tag 0.
absl::Status DecodeFetchResponse(const grpc::ByteBuffer& buffer, uint64_t* tag,
                                 FetchedBlocks* blocks);

}  // namespace psa

#endif  // PSA_KV_SERVICE_FETCH_WIRE_H_
