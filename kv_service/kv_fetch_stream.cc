#include "kv_service/kv_fetch_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kv_service/fetch_wire.h"

namespace psa {
namespace {

// The fetch stream runs on raw byte buffers: answers are decoded in place
// (fetch_wire.h) instead of being copied into protobuf strings.
const std::string kFetchMethod = "/psa.v1.KvService/FetchBlocks";

}  // namespace

absl::Status WithShard(const std::string& shard, const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("KV shard ", shard, ": ", s.error_message()));
}

void KvClient::FetchStream::Start(grpc::GenericStub* stub) {
  self_ = shared_from_this();
  stub->PrepareBidiStreamingCall(&context_, kFetchMethod, grpc::StubOptions(), this);
  // Writes start from application threads, outside reactions: the hold
  // keeps gRPC from finishing the call (OnDone) while one may still come.
  // It is removed once reading ends, after which Submit starts no write.
  AddHold();
  StartRead(&response_);
  StartCall();
}

bool KvClient::FetchStream::dead() {
  absl::MutexLock lock(&mu_);
  return ended_;
}

absl::Status KvClient::FetchStream::Submit(psa::v1::BlockQuery query, absl::Time deadline,
                                           FetchCallback done) {
  absl::MutexLock lock(&mu_);
  auto room = [this] {
    mu_.AssertHeld();
    return ended_ || static_cast<int>(pending_.size()) < max_outstanding_;
  };
  if (!mu_.AwaitWithDeadline(absl::Condition(&room), deadline)) {
    return absl::DeadlineExceededError(absl::StrCat(
        "KV shard ", shard_, ": ", pending_.size(),
        " fetches still pending at the deadline (back-pressure)"));
  }
  if (ended_) return end_status_;
  const uint64_t tag = next_tag_++;
  query.set_tag(tag);
  pending_.emplace(tag, Pending{deadline, std::move(done)});
  queued_.push_back(std::move(query));
  if (!writing_) WriteQueuedLocked();
  return absl::OkStatus();
}

void KvClient::FetchStream::ExpireOverdue(absl::Time now) {
  std::vector<FetchCallback> expired;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.deadline <= now) {
        expired.push_back(std::move(it->second.done));
        pending_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  for (auto& done : expired) {
    done(absl::DeadlineExceededError(
             absl::StrCat("KV shard ", shard_, ": fetch not answered before its deadline")),
         FetchedBlocks{});
  }
}

void KvClient::FetchStream::OnWriteDone(bool ok) {
  absl::MutexLock lock(&mu_);
  writing_ = false;
  // !ok: the stream is ending; OnReadDone and OnDone follow.
  if (ok && !queued_.empty()) WriteQueuedLocked();
}

void KvClient::FetchStream::OnReadDone(bool ok) {
  if (!ok) {  // the stream is ending; OnDone will have its status
    {
      absl::MutexLock lock(&mu_);
      ended_ = true;
      end_status_ =
          absl::UnavailableError(absl::StrCat("KV shard ", shard_, ": fetch stream ended"));
    }
    RemoveHold();
    return;
  }
  std::vector<DecodedAnswer> answers;
  if (absl::Status s = FetchResponseDecoder::Decode(response_, &answers); !s.ok()) {
    // Not ours to repair: end the stream; pending fetches get the error.
    context_.TryCancel();
    return;
  }
  for (DecodedAnswer& answer : answers) {
    FetchCallback done;
    {
      absl::MutexLock lock(&mu_);
      auto it = pending_.find(answer.tag);
      if (it != pending_.end()) {  // absent: expired already
        done = std::move(it->second.done);
        pending_.erase(it);
      }
    }
    if (!done) continue;
    if (!answer.status.ok()) {
      answer.status = absl::Status(
          answer.status.code(), absl::StrCat("KV shard ", shard_, ": ", answer.status.message()));
    }
    done(std::move(answer.status), std::move(answer.blocks));
  }
  response_.Clear();
  StartRead(&response_);
}

void KvClient::FetchStream::OnDone(const grpc::Status& status) {
  absl::Status failure = WithShard(shard_, status);
  if (failure.ok()) {
    failure = absl::UnavailableError(absl::StrCat("KV shard ", shard_, ": stream closed"));
  }
  absl::flat_hash_map<uint64_t, Pending> pending;
  {
    absl::MutexLock lock(&mu_);
    ended_ = true;
    end_status_ = failure;
    pending.swap(pending_);
  }
  for (auto& [tag, p] : pending) p.done(failure, FetchedBlocks{});
  done_.Notify();
  auto keep = std::move(self_);  // may destroy this when the scope ends
}

void KvClient::FetchStream::WriteQueuedLocked() {
  message_ = PackQueries(queued_);
  queued_.clear();
  writing_ = true;
  StartWrite(&message_);
}

}  // namespace psa
