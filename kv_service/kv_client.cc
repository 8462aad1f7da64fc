// KvClient: shard placement, connections and the unary calls (see
// kv_client.h). The fetch stream is KvClient::FetchStream, in
// kv_fetch_stream.h/.cc.
#include "kv_service/kv_client.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_callback_queue.h"
#include "common/grpc_status.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "kv_service/kv_fetch_stream.h"

namespace psa {
namespace {

// Every unary call is idempotent, so a shard that is briefly unreachable
// (restart, connection reset) is retried with backoff inside the deadline.
constexpr char kServiceConfig[] = R"({
  "methodConfig": [{
    "name": [
      {"service": "psa.v1.KvService", "method": "OpenSequence"},
      {"service": "psa.v1.KvService", "method": "GetMetadata"},
      {"service": "psa.v1.KvService", "method": "LeaseSequence"},
      {"service": "psa.v1.KvService", "method": "ReleaseSequence"},
      {"service": "psa.v1.KvService", "method": "GetStats"}
    ],
    "retryPolicy": {
      "maxAttempts": 5,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
})";

// Bytes a KvBlock adds to a message beyond its payload (tags, lengths).
constexpr uint64_t kBlockEnvelopeBytes = 32;

}  // namespace

absl::StatusOr<std::unique_ptr<KvClient>> KvClient::Connect(KvClientOptions options) {
  PinGrpcCallbackQueue();  // fetch streams use the callback API; see the header
  if (options.shards.empty()) {
    return absl::InvalidArgumentError("no KV service shards given");
  }
  for (const std::string& s : options.shards) {
    if (s.empty() || s.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV shard address \"", s, "\" must look like host:port"));
    }
  }
  if (options.fetch_connections < 1 || options.fetch_connections > 64) {
    return absl::InvalidArgumentError("fetch_connections must be in [1, 64]");
  }
  if (options.max_outstanding_fetches < 1) {
    return absl::InvalidArgumentError("max_outstanding_fetches must be at least 1");
  }
  return std::unique_ptr<KvClient>(new KvClient(std::move(options)));
}

KvClient::KvClient(KvClientOptions options) : options_(std::move(options)) {
  grpc::ChannelArguments args;
  args.SetServiceConfigJSON(kServiceConfig);
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  // Notice a silently dead peer (no FIN) on a long-lived stream.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  // Reconnect quickly after a shard restarts (gRPC's default waits 1-120 s),
  // so that retried calls find it within their backoff.
  // (Not GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: it also caps the connect timeout.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  for (const std::string& address : options_.shards) {
    auto shard = std::make_unique<Shard>();
    shard->address = address;
    for (int i = 0; i < options_.fetch_connections; ++i) {
      grpc::ChannelArguments conn_args = args;
      // Distinct arguments and a local pool: a connection of its own.
      conn_args.SetInt("psa.connection_index", i);
      conn_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      auto c = std::make_unique<Connection>();
      c->channel =
          grpc::CreateCustomChannel(address,
                                    options_.credentials ? options_.credentials
                                                         : grpc::InsecureChannelCredentials(),
                                    conn_args);
      c->stub = psa::v1::KvService::NewStub(c->channel);
      c->raw_stub = std::make_unique<grpc::GenericStub>(c->channel);
      shard->connections.push_back(std::move(c));
    }
    shards_.emplace(address, std::move(shard));
    ring_.AddShard(address);
  }
  deadline_thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(10))) {
      ExpireOverdueFetches();
    }
  });
}

KvClient::~KvClient() {
  stop_.Notify();
  deadline_thread_.join();
  for (auto& [address, shard] : shards_) {
    for (auto& c : shard->connections) {
      std::shared_ptr<FetchStream> stream;
      {
        absl::MutexLock lock(&c->mu);
        stream = std::move(c->stream);
      }
      if (stream) {
        stream->Cancel();
        stream->WaitDone();
      }
    }
  }
}

absl::string_view KvClient::PlacementKey(absl::string_view sequence_id) {
  return sequence_id.substr(0, sequence_id.find('/'));
}

const std::string& KvClient::ShardFor(const std::string& sequence_id) const {
  return ring_.ShardFor(PlacementKey(sequence_id));
}

KvClient::Shard& KvClient::ShardOf(const std::string& sequence_id) {
  return *shards_.at(ShardFor(sequence_id));
}

std::unique_ptr<grpc::ClientContext> KvClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  return ctx;
}

absl::StatusOr<psa::v1::OpenSequenceResponse> KvClient::Open(
    const std::string& sequence_id, const psa::v1::KvLayout& layout) {
  psa::v1::OpenSequenceRequest request;
  request.set_sequence_id(sequence_id);
  *request.mutable_layout() = layout;
  psa::v1::OpenSequenceResponse response;
  auto ctx = Context();
  const grpc::Status s = ShardOf(sequence_id).stub()->OpenSequence(ctx.get(), request, &response);
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  return response;
}

absl::StatusOr<psa::v1::OpenSequenceResponse> KvClient::OpenLinked(
    const std::string& sequence_id, const psa::v1::KvLayout& layout, const std::string& source,
    uint32_t num_blocks) {
  if (ShardFor(sequence_id) != ShardFor(source)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "\"", sequence_id, "\" and \"", source, "\" live on different shards (",
        ShardFor(sequence_id), ", ", ShardFor(source), "); a link needs both on one"));
  }
  psa::v1::OpenSequenceRequest request;
  request.set_sequence_id(sequence_id);
  *request.mutable_layout() = layout;
  request.mutable_prefix_from()->set_sequence_id(source);
  request.mutable_prefix_from()->set_num_blocks(num_blocks);
  psa::v1::OpenSequenceResponse response;
  auto ctx = Context();
  const grpc::Status s = ShardOf(sequence_id).stub()->OpenSequence(ctx.get(), request, &response);
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  return response;
}

absl::StatusOr<psa::v1::WriteBlocksResponse> KvClient::Write(
    const std::string& sequence_id, absl::Span<const psa::v1::KvBlock> blocks) {
  psa::v1::WriteBlocksResponse response;
  auto ctx = Context();
  auto writer = ShardOf(sequence_id).stub()->WriteBlocks(ctx.get(), &response);
  const uint64_t budget = options_.max_message_bytes - 1024;
  psa::v1::WriteBlocksRequest message;
  message.set_sequence_id(sequence_id);
  uint64_t message_bytes = 0;
  bool sent = true;
  for (const psa::v1::KvBlock& block : blocks) {
    const uint64_t bytes = block.data().size() + block.metadata().size() + kBlockEnvelopeBytes;
    if (message.blocks_size() > 0 && message_bytes + bytes > budget) {
      if (!(sent = writer->Write(message))) break;  // the server ended the call
      message.clear_blocks();
      message_bytes = 0;
    }
    *message.add_blocks() = block;
    message_bytes += bytes;
  }
  if (sent && message.blocks_size() > 0) writer->Write(message);
  writer->WritesDone();
  const grpc::Status s = writer->Finish();
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  return response;
}

absl::StatusOr<std::vector<psa::v1::LayerMetadata>> KvClient::ReadMetadata(
    const std::string& sequence_id) {
  psa::v1::GetMetadataRequest request;
  request.set_sequence_id(sequence_id);
  auto ctx = Context();
  auto reader = ShardOf(sequence_id).stub()->GetMetadata(ctx.get(), request);
  std::vector<psa::v1::LayerMetadata> layers;
  psa::v1::LayerMetadata layer;
  while (reader->Read(&layer)) layers.push_back(std::move(layer));
  const grpc::Status s = reader->Finish();
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  return layers;
}

absl::StatusOr<psa::v1::LeaseSequenceResponse> KvClient::Lease(const std::string& sequence_id,
                                                               uint64_t lease_id,
                                                               absl::Duration ttl) {
  psa::v1::LeaseSequenceRequest request;
  request.set_sequence_id(sequence_id);
  request.set_lease_id(lease_id);
  request.set_ttl_ms(absl::ToInt64Milliseconds(ttl));
  // A new lease is a lookup: a miss comes back as found = false, so the
  // shard does not count it as a failed RPC (older shards: NOT_FOUND).
  request.set_if_stored(lease_id == 0);
  psa::v1::LeaseSequenceResponse response;
  auto ctx = Context();
  const grpc::Status s = ShardOf(sequence_id).stub()->LeaseSequence(ctx.get(), request, &response);
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  if (lease_id == 0 && response.lease_id() == 0) {  // found = false (lease ids start at 1)
    return absl::NotFoundError(absl::StrCat("sequence \"", sequence_id, "\" is not stored on ",
                                            ShardFor(sequence_id)));
  }
  return response;
}

absl::StatusOr<uint64_t> KvClient::Release(const std::string& sequence_id) {
  psa::v1::ReleaseSequenceRequest request;
  request.set_sequence_id(sequence_id);
  psa::v1::ReleaseSequenceResponse response;
  auto ctx = Context();
  const grpc::Status s =
      ShardOf(sequence_id).stub()->ReleaseSequence(ctx.get(), request, &response);
  if (!s.ok()) return WithShard(ShardFor(sequence_id), s);
  return response.bytes_freed();
}

absl::StatusOr<psa::v1::KvStats> KvClient::Stats(const std::string& shard) {
  auto it = shards_.find(shard);
  if (it == shards_.end()) {
    return absl::NotFoundError(absl::StrCat("\"", shard, "\" is not one of this client's shards (",
                                            absl::StrJoin(options_.shards, ", "), ")"));
  }
  psa::v1::KvStats response;
  auto ctx = Context();
  const grpc::Status s = it->second->stub()->GetStats(ctx.get(), psa::v1::GetStatsRequest(),
                                                    &response);
  if (!s.ok()) return WithShard(shard, s);
  return response;
}

std::shared_ptr<KvClient::FetchStream> KvClient::LiveStream(const std::string& address,
                                                          Connection& c) {
  absl::MutexLock lock(&c.mu);
  if (c.stream == nullptr || c.stream->dead()) {
    c.stream = std::make_shared<FetchStream>(address, options_.max_outstanding_fetches);
    c.stream->Start(c.raw_stub.get());
  }
  return c.stream;
}

absl::Status KvClient::FetchAsync(const std::string& sequence_id, uint32_t layer,
                                  absl::Span<const uint32_t> block_indices,
                                  absl::Time deadline, FetchCallback done, int kv_head) {
  psa::v1::BlockQuery query;
  query.set_sequence_id(sequence_id);
  query.set_layer(layer);
  if (kv_head >= 0) query.set_kv_head(kv_head);
  query.mutable_block_indices()->Add(block_indices.begin(), block_indices.end());
  Shard& shard = ShardOf(sequence_id);
  Connection& c = *shard.connections[shard.next++ % shard.connections.size()];
  return LiveStream(shard.address, c)->Submit(std::move(query), deadline, std::move(done));
}

absl::StatusOr<FetchedBlocks> KvClient::Fetch(const std::string& sequence_id, uint32_t layer,
                                              absl::Span<const uint32_t> block_indices,
                                              absl::Duration timeout) {
  struct Result {
    absl::Notification ready;
    absl::Status status;
    FetchedBlocks blocks;
  };
  auto result = std::make_shared<Result>();
  absl::Status s = FetchAsync(sequence_id, layer, block_indices, absl::Now() + timeout,
                              [result](absl::Status status, FetchedBlocks blocks) {
                                result->status = std::move(status);
                                result->blocks = std::move(blocks);
                                result->ready.Notify();
                              });
  if (!s.ok()) return s;
  result->ready.WaitForNotification();  // the deadline thread bounds this
  if (!result->status.ok()) return result->status;
  return std::move(result->blocks);
}

void KvClient::ExpireOverdueFetches() {
  const absl::Time now = absl::Now();
  for (auto& [address, shard] : shards_) {
    for (auto& c : shard->connections) {
      std::shared_ptr<FetchStream> stream;
      {
        absl::MutexLock lock(&c->mu);
        stream = c->stream;
      }
      if (stream) stream->ExpireOverdue(now);
    }
  }
}

}  // namespace psa
