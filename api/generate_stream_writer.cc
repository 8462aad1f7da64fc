#include "api/generate_stream_writer.h"

namespace psa {

void GenerateStreamWriter::Push(const psa::v1::GenerateResponse& message) {
  absl::MutexLock lock(&mu_);
  pending_.mutable_token_ids()->Add(message.token_ids().begin(), message.token_ids().end());
  pending_.mutable_text()->append(message.text());
  if (!message.finish_reason().empty()) {
    pending_.set_finish_reason(message.finish_reason());
    *pending_.mutable_usage() = message.usage();
  }
  has_pending_ = true;
  MaybeWriteLocked();
}

void GenerateStreamWriter::Close(const grpc::Status& status) {
  absl::MutexLock lock(&mu_);
  final_status_ = status;
  closed_ = true;
  MaybeWriteLocked();
}

void GenerateStreamWriter::Unref() {
  bool last;
  {
    absl::MutexLock lock(&mu_);
    last = --refs_ == 0;
  }
  if (last) delete this;
}

void GenerateStreamWriter::OnWriteDone(bool ok) {
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (ok) {
      MaybeWriteLocked();
      return;
    }
    if (!finish_called_) {  // the client is gone: send nothing more
      finish_called_ = true;
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
    }
  }
  OnClientGone();
}

void GenerateStreamWriter::MaybeWriteLocked() {
  if (writing_ || finish_called_) return;
  if (has_pending_) {
    in_flight_.Swap(&pending_);
    pending_.Clear();
    has_pending_ = false;
    writing_ = true;
    StartWrite(&in_flight_);
    return;
  }
  if (closed_) {
    finish_called_ = true;
    Finish(final_status_);
  }
}

}  // namespace psa
