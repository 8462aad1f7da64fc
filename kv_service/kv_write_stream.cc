// KvServiceImpl's WriteBlocks stream (kv_service_impl.h): one reactor per
// call, each message one atomic store write.
#include <string>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "kv_service/kv_service_impl.h"

namespace psa {

// Client-streaming block writes; each message is one atomic store write.
class KvServiceImpl::WriteReactor final
    : public grpc::ServerReadReactor<psa::v1::WriteBlocksRequest> {
 public:
  WriteReactor(KvServiceImpl* service, psa::v1::WriteBlocksResponse* response)
      : service_(service), response_(response), start_(absl::Now()) {
    service_->active_streams_.Add({{"method", "WriteBlocks"}}).Add(1);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      FinishWith(grpc::Status::OK);
      return;
    }
    std::vector<BlockWrite> writes;
    writes.reserve(request_.blocks_size());
    uint64_t bytes = 0;
    for (const psa::v1::KvBlock& b : request_.blocks()) {
      writes.push_back(BlockWrite{b.layer(), b.index(), b.data(), b.metadata()});
      bytes += b.data().size() + b.metadata().size();
    }
    absl::StatusOr<WriteResult> result =
        service_->store_->Write(request_.sequence_id(), writes);
    if (!result.ok()) {
      FinishWith(grpc::Status(
          static_cast<grpc::StatusCode>(result.status().code()),
          absl::StrCat("message ", messages_ + 1, " refused (", messages_,
                       " earlier messages were stored): ", result.status().message())));
      return;
    }
    ++messages_;
    response_->set_blocks_written(response_->blocks_written() + result->written);
    response_->set_blocks_unchanged(response_->blocks_unchanged() + result->unchanged);
    response_->set_blocks_shared(response_->blocks_shared() + result->shared);
    service_->write_blocks_.Increment(result->written);
    service_->write_bytes_.Increment(bytes);
    StartRead(&request_);
  }

  void OnDone() override {
    service_->active_streams_.Add({{"method", "WriteBlocks"}}).Add(-1);
    service_->Record("WriteBlocks", status_, start_);
    delete this;
  }

 private:
  void FinishWith(grpc::Status status) {
    status_ = status;
    Finish(std::move(status));
  }

  KvServiceImpl* const service_;
  psa::v1::WriteBlocksResponse* const response_;
  const absl::Time start_;
  psa::v1::WriteBlocksRequest request_;
  uint64_t messages_ = 0;
  grpc::Status status_;
};

grpc::ServerReadReactor<psa::v1::WriteBlocksRequest>* KvServiceImpl::WriteBlocks(
    grpc::CallbackServerContext* ctx, psa::v1::WriteBlocksResponse* response) {
  return new WriteReactor(this, response);
}

}  // namespace psa
