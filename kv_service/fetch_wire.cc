#include "kv_service/fetch_wire.h"

#include <algorithm>
#include <cstring>

#include "grpcpp/impl/codegen/proto_utils.h"

namespace psa {
namespace {

using psa::v1::BlockAnswer;
using psa::v1::FetchBlocksResponse;

// Protobuf wire format: a key is (field number << 3 | wire type).
constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

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

// Sequential reader over the slices of a received message.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {}
  uint64_t position() const { return position_; }
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
      if (out) {
        out->append(reinterpret_cast<const char*>(slices_[slice_].begin()) + offset_, take);
      }
      offset_ += take;
      position_ += take;
      n -= take;
    }
    return true;
  }
  // Skips a field's value of `wire_type`.
  bool SkipValue(int wire_type) {
    uint64_t v;
    switch (wire_type) {
      case kVarint:
        return ReadVarint(&v);
      case kFixed64:
        return Skip(8);
      case kLengthDelimited:
        return ReadVarint(&v) && Skip(v);
      case kFixed32:
        return Skip(4);
      default:
        return false;
    }
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

EncodedAnswer EncodeAnswer(uint64_t tag,
                           const std::vector<std::shared_ptr<const std::string>>& blocks,
                           uint64_t offset, uint64_t length) {
  if (length == 0 && !blocks.empty()) length = blocks[0]->size() - offset;
  const uint64_t total = length * blocks.size();
  std::string head;
  if (tag != 0) {  // proto3 omits default values; so do we
    AppendKey(&head, BlockAnswer::kTagFieldNumber, kVarint);
    AppendVarint(&head, tag);
  }
  if (!blocks.empty()) {
    AppendKey(&head, BlockAnswer::kBlockBytesFieldNumber, kVarint);
    AppendVarint(&head, length);
    AppendKey(&head, BlockAnswer::kDataFieldNumber, kLengthDelimited);
    AppendVarint(&head, total);
  }
  EncodedAnswer answer;
  answer.bytes = head.size() + total;
  answer.slices.reserve(blocks.size() + 1);
  answer.slices.emplace_back(head);
  for (const auto& b : blocks) {
    // The slice holds its own reference; gRPC drops it once the bytes are sent.
    answer.slices.emplace_back(const_cast<char*>(b->data()) + offset, length, &ReleaseBlock,
                               new std::shared_ptr<const std::string>(b));
  }
  return answer;
}

EncodedAnswer EncodeErrorAnswer(uint64_t tag, const absl::Status& status) {
  BlockAnswer answer;
  answer.set_tag(tag);
  answer.set_error_code(static_cast<int>(status.code()));
  answer.set_error_message(std::string(status.message()));
  EncodedAnswer encoded;
  encoded.slices.emplace_back(answer.SerializeAsString());
  encoded.bytes = encoded.slices.back().size();
  return encoded;
}

grpc::ByteBuffer PackAnswers(std::vector<EncodedAnswer> answers) {
  std::vector<grpc::Slice> slices;
  for (EncodedAnswer& a : answers) {
    std::string head;
    AppendKey(&head, FetchBlocksResponse::kAnswersFieldNumber, kLengthDelimited);
    AppendVarint(&head, a.bytes);
    slices.emplace_back(head);
    for (grpc::Slice& s : a.slices) slices.push_back(std::move(s));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

absl::Status DecodeFetchRequest(grpc::ByteBuffer* buffer, psa::v1::FetchBlocksRequest* request) {
  const grpc::Status s =
      grpc::SerializationTraits<psa::v1::FetchBlocksRequest>::Deserialize(buffer, request);
  if (!s.ok()) return absl::InvalidArgumentError("FetchBlocksRequest does not parse");
  return absl::OkStatus();
}

grpc::ByteBuffer PackQueries(const std::vector<psa::v1::BlockQuery>& queries) {
  psa::v1::FetchBlocksRequest request;
  for (const auto& q : queries) *request.add_queries() = q;
  grpc::ByteBuffer buffer;
  bool own_buffer;
  grpc::SerializationTraits<psa::v1::FetchBlocksRequest>::Serialize(request, &buffer,
                                                                    &own_buffer);
  return buffer;
}

absl::Status FetchResponseDecoder::Decode(const grpc::ByteBuffer& buffer,
                                          std::vector<DecodedAnswer>* out) {
  out->clear();
  auto message = std::make_shared<FetchedBlocks::Message>();
  if (!buffer.Dump(&message->slices).ok()) return absl::InternalError("unreadable buffer");
  uint64_t start = 0;
  for (const grpc::Slice& s : message->slices) {
    message->starts.push_back(start);
    start += s.size();
  }
  const uint64_t message_bytes = start;
  const absl::Status malformed = absl::InternalError("malformed FetchBlocksResponse");
  SliceReader in(message->slices);
  while (in.position() < message_bytes) {
    uint64_t key, length;
    if (!in.ReadVarint(&key)) return malformed;
    if (key != (FetchBlocksResponse::kAnswersFieldNumber << 3 | kLengthDelimited)) {
      if (!in.SkipValue(key & 7)) return malformed;  // unknown field
      continue;
    }
    if (!in.ReadVarint(&length)) return malformed;
    const uint64_t end = in.position() + length;
    DecodedAnswer answer;
    uint64_t error_code = 0, data_size = 0, block_bytes = 0, value;
    std::string error_message;
    while (in.position() < end) {
      if (!in.ReadVarint(&key)) return malformed;
      const int field = static_cast<int>(key >> 3);
      const int type = static_cast<int>(key & 7);
      if (type == kVarint) {
        if (!in.ReadVarint(&value)) return malformed;
        if (field == BlockAnswer::kTagFieldNumber) answer.tag = value;
        if (field == BlockAnswer::kErrorCodeFieldNumber) error_code = value;
        if (field == BlockAnswer::kBlockBytesFieldNumber) block_bytes = value;
      } else if (type == kLengthDelimited) {
        if (!in.ReadVarint(&value)) return malformed;
        if (field == BlockAnswer::kDataFieldNumber) {
          answer.blocks.data_offset_ = in.position();
          data_size = value;
        }
        if (!in.Skip(value, field == BlockAnswer::kErrorMessageFieldNumber ? &error_message
                                                                           : nullptr)) {
          return malformed;
        }
      } else if (!in.SkipValue(type)) {
        return malformed;
      }
    }
    if (in.position() != end) return malformed;
    if (error_code != 0) {
      answer.status = absl::Status(static_cast<absl::StatusCode>(error_code), error_message);
    } else {
      if (data_size > 0 && (block_bytes == 0 || data_size % block_bytes != 0)) return malformed;
      answer.blocks.message_ = message;
      answer.blocks.block_bytes_ = block_bytes;
      answer.blocks.count_ = data_size == 0 ? 0 : data_size / block_bytes;
    }
    out->push_back(std::move(answer));
  }
  return absl::OkStatus();
}

void FetchedBlocks::CopyTo(size_t first, size_t n, char* dst) const {
  CopyBytes(first * block_bytes_, n * block_bytes_, dst);
}

void FetchedBlocks::CopyBytes(uint64_t from, uint64_t n, char* dst) const {
  if (n == 0) return;
  const auto& starts = message_->starts;
  const auto& slices = message_->slices;
  uint64_t offset = data_offset_ + from;
  uint64_t left = n;
  size_t i = std::upper_bound(starts.begin(), starts.end(), offset) - starts.begin() - 1;
  while (left > 0) {
    const uint64_t in_slice = offset - starts[i];
    const uint64_t take = std::min<uint64_t>(left, slices[i].size() - in_slice);
    std::memcpy(dst, slices[i].begin() + in_slice, take);
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
  CopyTo(0, count_, s.data());
  return s;
}

}  // namespace psa
