// KvClient: how workers, tools and tests talk to KV service shards.
//
// Sequences are placed on shards by consistent hashing (see HashRing) of
// their id's placement key: the part before the first '/', or the whole id.
// Every client with the same shard list agrees on placement, and sequences
// that share a key ("doc42/a", "doc42/b") share a shard, as links need.
// Unary calls carry a deadline and are retried on UNAVAILABLE (gRPC retry
// policy; all of them are idempotent). Fetches go over one long-lived
// bidirectional stream per shard with many requests outstanding; a stream
// that breaks fails its pending fetches with the stream's status (a killed
// shard gives UNAVAILABLE within moments) and the next fetch opens a new one.
//
// Thread-safe. Fetch callbacks run on gRPC threads and must not block long.
#ifndef PSA_KV_SERVICE_KV_CLIENT_H_
#define PSA_KV_SERVICE_KV_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "grpcpp/security/credentials.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kv_service/fetch_wire.h"
#include "common/hash_ring.h"
#include "grpcpp/generic/generic_stub.h"
#include "proto/psa/v1/kv_service.grpc.pb.h"

namespace psa {

struct KvClientOptions {
  std::vector<std::string> shards;             // "host:port" each
  absl::Duration rpc_timeout = absl::Seconds(10);  // unary calls and writes
  int max_outstanding_fetches = 64;            // per fetch stream (back-pressure)
  // TCP connections per shard carrying fetch streams, used round-robin: one
  // connection's HTTP/2 transport works on one core at a time.
  int fetch_connections = 2;
  uint64_t max_message_bytes = 64ull << 20;    // must match the servers' --max_message
  // Credentials of the connections to the shards (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
};

class KvClient {
 public:
  // Called once per fetch with its outcome; `blocks` (in request order) is
  // empty unless ok.
  using FetchCallback = std::function<void(absl::Status status, FetchedBlocks blocks)>;

  static absl::StatusOr<std::unique_ptr<KvClient>> Connect(KvClientOptions options);
  // Ends the fetch streams; pending fetches complete with CANCELLED first.
  ~KvClient();

  const std::string& ShardFor(const std::string& sequence_id) const;
  static absl::string_view PlacementKey(absl::string_view sequence_id);
  const std::vector<std::string>& shards() const { return options_.shards; }

  absl::StatusOr<psa::v1::OpenSequenceResponse> Open(const std::string& sequence_id,
                                                     const psa::v1::KvLayout& layout);
  // Opens `sequence_id` as an alias of the first `num_blocks` blocks of
  // `source`, which must live on the same shard (ShardFor) — see
  // OpenSequenceRequest.prefix_from.
  absl::StatusOr<psa::v1::OpenSequenceResponse> OpenLinked(const std::string& sequence_id,
                                                           const psa::v1::KvLayout& layout,
                                                           const std::string& source,
                                                           uint32_t num_blocks);
  // Writes blocks in as few messages as the message limit allows.
  absl::StatusOr<psa::v1::WriteBlocksResponse> Write(const std::string& sequence_id,
                                                     absl::Span<const psa::v1::KvBlock> blocks);
  absl::StatusOr<std::vector<psa::v1::LayerMetadata>> ReadMetadata(
      const std::string& sequence_id);
  absl::StatusOr<psa::v1::LeaseSequenceResponse> Lease(const std::string& sequence_id,
                                                       uint64_t lease_id, absl::Duration ttl);
  absl::StatusOr<uint64_t> Release(const std::string& sequence_id);
  absl::StatusOr<psa::v1::KvStats> Stats(const std::string& shard);

  // Queues a fetch and returns; `done` runs exactly once, with
  // DEADLINE_EXCEEDED if no answer came by `deadline`. Waits (back-pressure)
  // while the shard's stream has max_outstanding_fetches pending; an error
  // return means `done` will not run. With kv_head >= 0 each block is only
  // that head's part (see BlockQuery.kv_head).
  absl::Status FetchAsync(const std::string& sequence_id, uint32_t layer,
                          absl::Span<const uint32_t> block_indices, absl::Time deadline,
                          FetchCallback done, int kv_head = -1);
  // Blocking fetch.
  absl::StatusOr<FetchedBlocks> Fetch(const std::string& sequence_id, uint32_t layer,
                                      absl::Span<const uint32_t> block_indices,
                                      absl::Duration timeout);

 private:
  class FetchStream;
  struct Connection {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<psa::v1::KvService::Stub> stub;
    std::unique_ptr<grpc::GenericStub> raw_stub;  // fetch streams: byte buffers
    absl::Mutex mu;
    std::shared_ptr<FetchStream> stream ABSL_GUARDED_BY(mu);  // null or live
  };
  struct Shard {
    std::string address;
    std::vector<std::unique_ptr<Connection>> connections;  // [0] also carries unary calls
    std::atomic<uint32_t> next{0};                         // round-robin for fetches
    psa::v1::KvService::Stub* stub() { return connections[0]->stub.get(); }
  };

  explicit KvClient(KvClientOptions options);
  Shard& ShardOf(const std::string& sequence_id);
  std::shared_ptr<FetchStream> LiveStream(const std::string& address, Connection& c);
  void ExpireOverdueFetches();
  std::unique_ptr<grpc::ClientContext> Context() const;

  const KvClientOptions options_;
  HashRing ring_;
  absl::flat_hash_map<std::string, std::unique_ptr<Shard>> shards_;
  absl::Notification stop_;
  std::thread deadline_thread_;  // fails fetches whose deadline passed
};

}  // namespace psa

#endif  // PSA_KV_SERVICE_KV_CLIENT_H_
