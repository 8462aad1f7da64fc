#include "kv_service/fetch_wire.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/slice.h"

namespace psa {
namespace {

// Protobuf wire format: a key is (field number << 3 | wire type).
constexpr int kVarint = 0;
constexpr int kLengthDelimited = 2;

void AppendVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void AppendKey(std::string* out, int field, int wire_type) {
  AppendVarint(out, static_cast<uint64_t>(field) << 3 | wire_type);
}

void ReleaseBlock(void* ref) { delete static_cast<std::shared_ptr<const std::string>*>(ref); }

}  // namespace

grpc::ByteBuffer EncodeFetchBlocks(
    uint64_t tag, const std::vector<std::shared_ptr<const std::string>>& blocks) {
  using psa::v1::FetchBlocksResponse;
  uint64_t total = 0;
  for (const auto& b : blocks) total += b->size();
  std::string head;
  if (tag != 0) {  // proto3 omits default values; so do we
    AppendKey(&head, FetchBlocksResponse::kTagFieldNumber, kVarint);
    AppendVarint(&head, tag);
  }
  if (!blocks.empty()) {
    AppendKey(&head, FetchBlocksResponse::kBlockBytesFieldNumber, kVarint);
    AppendVarint(&head, blocks[0]->size());
    AppendKey(&head, FetchBlocksResponse::kDataFieldNumber, kLengthDelimited);
    AppendVarint(&head, total);
  }
  std::vector<grpc::Slice> slices;
  slices.reserve(blocks.size() + 1);
  slices.emplace_back(head);
  for (const auto& b : blocks) {
    // The slice holds its own reference; gRPC drops it once the bytes are sent.
    slices.emplace_back(const_cast<char*>(b->data()), b->size(), &ReleaseBlock,
                        new std::shared_ptr<const std::string>(b));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer EncodeFetchError(uint64_t tag, const absl::Status& status) {
  psa::v1::FetchBlocksResponse response;
  response.set_tag(tag);
  response.set_error_code(static_cast<int>(status.code()));
  response.set_error_message(std::string(status.message()));
  grpc::Slice slice(response.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

absl::Status DecodeFetchRequest(grpc::ByteBuffer* buffer, psa::v1::FetchBlocksRequest* request) {
  const grpc::Status s =
      grpc::SerializationTraits<psa::v1::FetchBlocksRequest>::Deserialize(buffer, request);
  if (!s.ok()) {
    return absl::InvalidArgumentError("FetchBlocksRequest does not parse as protobuf");
  }
  return absl::OkStatus();
}

namespace {

// Sequential reader over the slices of a received message.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {}
  uint64_t position() const { return position_; }
  bool done() {
    SkipEmpty();
    return slice_ == slices_.size();
  }
  bool ReadByte(uint8_t* b) {
    SkipEmpty();
    if (slice_ == slices_.size()) return false;
    *b = slices_[slice_].begin()[offset_++];
    ++position_;
    return true;
  }
  bool ReadVarint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!ReadByte(&b)) return false;
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  // Skips n bytes, appending them to `out` if given.
  bool Skip(uint64_t n, std::string* out = nullptr) {
    while (n > 0) {
      SkipEmpty();
      if (slice_ == slices_.size()) return false;
      const uint64_t take = std::min<uint64_t>(n, slices_[slice_].size() - offset_);
      if (out) out->append(reinterpret_cast<const char*>(slices_[slice_].begin()) + offset_, take);
      offset_ += take;
      position_ += take;
      n -= take;
    }
    return true;
  }

 private:
  void SkipEmpty() {
    while (slice_ < slices_.size() && offset_ == slices_[slice_].size()) {
      ++slice_;
      offset_ = 0;
    }
  }
  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0;
  size_t offset_ = 0;
  uint64_t position_ = 0;
};

}  // namespace

absl::Status DecodeFetchResponse(const grpc::ByteBuffer& buffer, uint64_t* tag,
                                 FetchedBlocks* blocks) {
  using psa::v1::FetchBlocksResponse;
  *tag = 0;
  *blocks = FetchedBlocks();
  if (!buffer.Dump(&blocks->slices_).ok()) return absl::InternalError("unreadable buffer");
  SliceReader in(blocks->slices_);
  const absl::Status malformed = absl::InternalError("malformed FetchBlocksResponse");
  uint64_t error_code = 0, data_size = 0, block_bytes = 0, parsed_tag = 0;
  std::string error_message;
  while (!in.done()) {
    uint64_t key, value;
    if (!in.ReadVarint(&key)) return malformed;
    const int field = static_cast<int>(key >> 3);
    switch (key & 7) {
      case kVarint:
        if (!in.ReadVarint(&value)) return malformed;
        if (field == FetchBlocksResponse::kTagFieldNumber) parsed_tag = value;
        if (field == FetchBlocksResponse::kErrorCodeFieldNumber) error_code = value;
        if (field == FetchBlocksResponse::kBlockBytesFieldNumber) block_bytes = value;
        break;
      case kLengthDelimited:
        if (!in.ReadVarint(&value)) return malformed;
        if (field == FetchBlocksResponse::kDataFieldNumber) {
          blocks->data_offset_ = in.position();
          data_size = value;
        }
        if (!in.Skip(value, field == FetchBlocksResponse::kErrorMessageFieldNumber
                                ? &error_message
                                : nullptr)) {
          return malformed;
        }
        break;
      case 1:  // fixed64
        if (!in.Skip(8)) return malformed;
        break;
      case 5:  // fixed32
        if (!in.Skip(4)) return malformed;
        break;
      default:
        return malformed;
    }
  }
  *tag = parsed_tag;
  if (error_code != 0) {
    *blocks = FetchedBlocks();
    return absl::Status(static_cast<absl::StatusCode>(error_code), error_message);
  }
  if (data_size > 0 && (block_bytes == 0 || data_size % block_bytes != 0)) return malformed;
  blocks->block_bytes_ = block_bytes;
  blocks->count_ = data_size == 0 ? 0 : data_size / block_bytes;
  uint64_t start = 0;
  for (const grpc::Slice& s : blocks->slices_) {
    blocks->slice_starts_.push_back(start);
    start += s.size();
  }
  return absl::OkStatus();
}

void FetchedBlocks::CopyTo(size_t first, size_t n, char* dst) const {
  uint64_t offset = data_offset_ + first * block_bytes_;
  uint64_t left = n * block_bytes_;
  size_t i = std::upper_bound(slice_starts_.begin(), slice_starts_.end(), offset) -
             slice_starts_.begin() - 1;
  while (left > 0) {
    const uint64_t in_slice = offset - slice_starts_[i];
    const uint64_t take = std::min<uint64_t>(left, slices_[i].size() - in_slice);
    std::memcpy(dst, slices_[i].begin() + in_slice, take);
    dst += take;
    offset += take;
    left -= take;
    ++i;
  }
}

std::string FetchedBlocks::Block(size_t k) const {
  std::string s(block_bytes_, '\0');
  CopyTo(k, 1, s.data());
  return s;
}

std::string FetchedBlocks::ToString() const {
  std::string s(count_ * block_bytes_, '\0');
  if (count_ > 0) CopyTo(0, count_, s.data());
  return s;
}

}  // namespace psa
