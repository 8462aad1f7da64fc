// KvClient::FetchStream: one long-lived FetchBlocks stream to one shard
// connection, with many fetches outstanding (internal to KvClient).
//
// Owns the pending fetches sent on it and keeps itself alive (self_) from
// Start until gRPC calls OnDone, so KvClient holds it by shared_ptr and may
// drop it at any time. Thread-safe: Submit, ExpireOverdue, Cancel and dead
// may be called from any thread; the reactions run on gRPC threads, and so
// do the fetch callbacks (which must not block long).
#ifndef PSA_KV_SERVICE_KV_FETCH_STREAM_H_
#define PSA_KV_SERVICE_KV_FETCH_STREAM_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/generic/generic_stub.h"
#include "kv_service/kv_client.h"
#include "proto/psa/v1/kv_service.pb.h"

namespace psa {

// `s` as an absl::Status whose message names the shard; OK stays OK.
absl::Status WithShard(const std::string& shard, const grpc::Status& s);

class KvClient::FetchStream final
    : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
      public std::enable_shared_from_this<FetchStream> {
 public:
  FetchStream(std::string shard, int max_outstanding)
      : shard_(std::move(shard)), max_outstanding_(max_outstanding) {}

  // Opens the stream on `stub`; call once, on a stream held by shared_ptr.
  void Start(grpc::GenericStub* stub);

  // Whether the stream has ended (a new one is needed for more fetches).
  bool dead();

  // Sends a request once fewer than max_outstanding are pending.
  absl::Status Submit(psa::v1::BlockQuery query, absl::Time deadline, FetchCallback done);

  // Fails pending fetches whose deadline has passed.
  void ExpireOverdue(absl::Time now);

  // Ends the stream; pending fetches fail with CANCELLED. Returns at once.
  void Cancel() { context_.TryCancel(); }
  void WaitDone() { done_.WaitForNotification(); }

  void OnWriteDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  struct Pending {
    absl::Time deadline;
    FetchCallback done;
  };

  // Sends every queued query in one message.
  void WriteQueuedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string shard_;
  const int max_outstanding_;
  grpc::ClientContext context_;
  grpc::ByteBuffer response_;
  std::shared_ptr<FetchStream> self_;
  absl::Notification done_;

  absl::Mutex mu_;
  std::vector<psa::v1::BlockQuery> queued_ ABSL_GUARDED_BY(mu_);  // not yet sent
  grpc::ByteBuffer message_ ABSL_GUARDED_BY(mu_);                  // the write in flight
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_tag_ ABSL_GUARDED_BY(mu_) = 1;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status end_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa

#endif  // PSA_KV_SERVICE_KV_FETCH_STREAM_H_
