#include "kv_service/kv_service_impl.h"

#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "kv_service/fetch_wire.h"

namespace psa {
namespace {

// Answers a fetch stream may hold unsent before it stops reading queries:
// back-pressure on a client that does not read its answers.
constexpr size_t kMaxQueuedAnswers = 256;

}  // namespace

namespace {

// A stream whose client is gone: past its deadline that is the deadline's
// doing (counted as DEADLINE_EXCEEDED, as router and workers count it),
// else the client cancelled. gRPC ends a call at its deadline; the slack
// covers the time until the server sees it.
grpc::Status ClientGone(absl::Time deadline) {
  if (absl::Now() + absl::Milliseconds(20) >= deadline) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the call's deadline passed");
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
}

}  // namespace

// One long-lived fetch stream: reads queries, answers each in the order
// read. At most one write is in flight (a gRPC rule); answers that queue
// behind it leave together in the next message.
class KvServiceImpl::FetchReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  FetchReactor(KvServiceImpl* service, uint64_t max_message_bytes, absl::Time deadline)
      : service_(service),
        max_message_bytes_(max_message_bytes),
        start_(absl::Now()),
        deadline_(deadline) {
    service_->active_streams_.Add({{"method", "FetchBlocks"}}).Add(1);
    StartRead(&request_);
  }

  void Drain() {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    MaybeFinishLocked();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side, or the call ended
      absl::MutexLock lock(&mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    std::vector<EncodedAnswer> answers;
    service_->AnswerFetch(&request_, &answers);
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    for (EncodedAnswer& a : answers) queue_.push_back(std::move(a));
    if (!writing_) WriteQueuedLocked();
    if (draining_) {
      reads_done_ = true;  // read no more; finish once the queue is sent
    } else if (queue_.size() < kMaxQueuedAnswers) {
      StartRead(&request_);
    } else {
      read_paused_ = true;
    }
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {  // the client is gone: drop what is left
      queue_.clear();
      broken_ = true;
      MaybeFinishLocked();
      return;
    }
    if (!queue_.empty()) WriteQueuedLocked();
    if (read_paused_ && queue_.size() < kMaxQueuedAnswers / 2) {
      read_paused_ = false;
      StartRead(&request_);
    }
    MaybeFinishLocked();
  }

  // The client cancelled, or the deadline passed (a read then just ends,
  // as a half-close does): counted as such, whatever Finish said.
  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }

  void OnDone() override {
    service_->active_streams_.Add({{"method", "FetchBlocks"}}).Add(-1);
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) status_ = ClientGone(deadline_);
    }
    service_->Record("FetchBlocks", status_, start_);
    {
      absl::MutexLock lock(&service_->mu_);
      service_->fetch_streams_.erase(this);
    }
    delete this;
  }

 private:
  // Sends every queued answer that fits in one message (at least one).
  void WriteQueuedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<EncodedAnswer> batch;
    uint64_t bytes = 0;
    while (!queue_.empty() &&
           (batch.empty() || bytes + queue_.front().bytes + 16 <= max_message_bytes_)) {
      bytes += queue_.front().bytes + 16;
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    writing_ = true;
    message_ = PackAnswers(std::move(batch));
    StartWrite(&message_);
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || writing_) return;
    if (broken_) {
      status_ = ClientGone(deadline_);
    } else if (!queue_.empty()) {
      return;  // answers still to send
    } else if (draining_) {
      status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                             "KV service shutting down; reconnect to another shard");
    } else if (!reads_done_) {
      return;
    }
    finished_ = true;
    Finish(status_);
  }

  KvServiceImpl* const service_;
  const uint64_t max_message_bytes_;
  const absl::Time start_;
  const absl::Time deadline_;  // the call's
  grpc::ByteBuffer request_;  // only touched between StartRead and OnReadDone
  absl::Mutex mu_;
  std::deque<EncodedAnswer> queue_ ABSL_GUARDED_BY(mu_);
  grpc::ByteBuffer message_ ABSL_GUARDED_BY(mu_);  // the write in flight
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;  // OnCancel ran
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_;
};

// Streams one LayerMetadata message per layer.
class KvServiceImpl::MetadataReactor final
    : public grpc::ServerWriteReactor<psa::v1::LayerMetadata> {
 public:
  MetadataReactor(KvServiceImpl* service, const psa::v1::GetMetadataRequest& request,
                  absl::Time deadline)
      : service_(service), start_(absl::Now()), deadline_(deadline) {
    absl::Status s = service_->store_->ReadMetadata(request.sequence_id(), &per_layer_,
                                                    &blocks_per_layer_);
    if (!s.ok()) {
      status_ = ToGrpcStatus(s);
      Finish(status_);
      return;
    }
    WriteNext();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      status_ = ClientGone(deadline_);
      Finish(status_);
      return;
    }
    WriteNext();
  }

  void OnDone() override {
    service_->Record("GetMetadata", status_, start_);
    delete this;
  }

 private:
  void WriteNext() {
    if (next_ == per_layer_.size()) {
      Finish(grpc::Status::OK);
      return;
    }
    message_.Clear();
    message_.set_layer(next_);
    message_.set_num_blocks(blocks_per_layer_[next_]);
    message_.set_metadata(std::move(per_layer_[next_]));
    ++next_;
    StartWrite(&message_);
  }

  KvServiceImpl* const service_;
  const absl::Time start_;
  const absl::Time deadline_;  // the call's
  std::vector<std::string> per_layer_;
  std::vector<uint32_t> blocks_per_layer_;
  size_t next_ = 0;
  psa::v1::LayerMetadata message_;
  grpc::Status status_;
};

KvServiceImpl::KvServiceImpl(BlockStore* store, metrics::Registry* registry,
                             uint64_t max_message_bytes)
    : store_(store),
      max_message_bytes_(max_message_bytes),
      rpcs_(registry->AddCounter("psa_kv_rpcs_total", "RPCs finished, by method and code")),
      rpc_seconds_(registry->AddHistogram("psa_kv_rpc_duration_seconds",
                                          "RPC duration by method (streams: whole stream)",
                                          metrics::LatencyBuckets())),
      active_streams_(registry->AddGauge("psa_kv_active_streams", "Open streams by method")),
      fetch_queries_(registry->AddCounter("psa_kv_fetch_queries_total",
                                           "Block queries answered on fetch streams").Add()),
      fetch_blocks_(registry->AddCounter("psa_kv_fetch_blocks_total", "Blocks fetched").Add()),
      fetch_bytes_(registry->AddCounter("psa_kv_fetch_bytes_total",
                                        "Block bytes sent to fetchers").Add()),
      fetch_message_seconds_(
          registry->AddHistogram("psa_kv_fetch_message_duration_seconds",
                                 "Server time to answer one fetch message (its queries)",
                                 metrics::ExponentialBuckets(0.00001, 2.0, 16))
              .Add()),
      write_blocks_(registry->AddCounter("psa_kv_write_blocks_total",
                                         "New blocks written").Add()),
      write_bytes_(registry->AddCounter("psa_kv_write_bytes_total",
                                        "Bytes received in block writes").Add()),
      lookups_(registry->AddCounter(
          "psa_kv_lookups_total",
          "Lookups (LeaseSequence with if_stored, e.g. prompt prefixes) by result: hit or "
          "miss. A miss is an answer (RPC code OK), not an error")) {
  active_streams_.Add({{"method", "FetchBlocks"}});
  active_streams_.Add({{"method", "WriteBlocks"}});
  lookups_.Add({{"result", "hit"}});
  lookups_.Add({{"result", "miss"}});
}

void KvServiceImpl::Record(const char* method, const grpc::Status& status, absl::Time start) {
  rpcs_.Add({{"method", method}, {"code", GrpcCodeName(status.error_code())}}).Increment();
  rpc_seconds_.Add({{"method", method}}).Observe(absl::ToDoubleSeconds(absl::Now() - start));
}

grpc::ServerUnaryReactor* KvServiceImpl::FinishUnary(grpc::CallbackServerContext* ctx,
                                                     const char* method, absl::Time start,
                                                     const absl::Status& status) {
  const grpc::Status s = ToGrpcStatus(status);
  Record(method, s, start);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(s);
  return reactor;
}

void KvServiceImpl::Drain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  for (FetchReactor* r : fetch_streams_) r->Drain();
}

void KvServiceImpl::AnswerFetch(grpc::ByteBuffer* request_buffer,
                                std::vector<EncodedAnswer>* answers) {
  const absl::Time start = absl::Now();
  psa::v1::FetchBlocksRequest request;
  if (absl::Status s = DecodeFetchRequest(request_buffer, &request); !s.ok()) {
    answers->push_back(EncodeErrorAnswer(0, s));
    return;
  }
  std::vector<std::shared_ptr<const std::string>> blocks;
  for (const psa::v1::BlockQuery& query : request.queries()) {
    BlockStore::ByteRange range;
    absl::Status s;
    if (query.kv_head() > static_cast<uint32_t>(std::numeric_limits<int>::max())) {
      // Must not wrap (4294967295 would read as -1: all heads).
      s = absl::InvalidArgumentError(absl::StrCat(
          "kv_head ", query.kv_head(), " is out of range; no layout has that many KV heads"));
    } else {
      s = store_->ReadRefs(
          query.sequence_id(), query.layer(),
          query.has_kv_head() ? static_cast<int>(query.kv_head()) : BlockStore::kAllHeads,
          query.block_indices(),
          // room for the envelope fields
          max_message_bytes_ - 4096, &blocks, &range);
    }
    if (s.ok()) {
      answers->push_back(EncodeAnswer(query.tag(), blocks, range.offset, range.length));
      fetch_blocks_.Increment(blocks.size());
      fetch_bytes_.Increment(blocks.size() * range.length);
    } else {
      answers->push_back(EncodeErrorAnswer(query.tag(), s));
    }
    fetch_queries_.Increment();
  }
  fetch_message_seconds_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
}

grpc::ServerUnaryReactor* KvServiceImpl::OpenSequence(
    grpc::CallbackServerContext* ctx, const psa::v1::OpenSequenceRequest* request,
    psa::v1::OpenSequenceResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status s;
  if (!request->has_layout()) {
    s = absl::InvalidArgumentError("layout is missing");
  } else {
    bool created = false;
    std::vector<uint32_t> blocks;
    if (request->has_prefix_from()) {
      s = store_->OpenLinked(request->sequence_id(), request->layout(),
                             request->prefix_from().sequence_id(),
                             request->prefix_from().num_blocks(), &created, &blocks);
    } else {
      s = store_->Open(request->sequence_id(), request->layout(), &created, &blocks);
    }
    response->set_created(created);
    for (uint32_t n : blocks) response->add_blocks_per_layer(n);
  }
  return FinishUnary(ctx, "OpenSequence", start, s);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KvServiceImpl::FetchBlocks(
    grpc::CallbackServerContext* ctx) {
  absl::MutexLock lock(&mu_);
  auto* reactor = new FetchReactor(this, max_message_bytes_, absl::FromChrono(ctx->deadline()));
  fetch_streams_.insert(reactor);
  if (draining_) reactor->Drain();
  return reactor;
}

grpc::ServerWriteReactor<psa::v1::LayerMetadata>* KvServiceImpl::GetMetadata(
    grpc::CallbackServerContext* ctx, const psa::v1::GetMetadataRequest* request) {
  return new MetadataReactor(this, *request, absl::FromChrono(ctx->deadline()));
}

grpc::ServerUnaryReactor* KvServiceImpl::LeaseSequence(
    grpc::CallbackServerContext* ctx, const psa::v1::LeaseSequenceRequest* request,
    psa::v1::LeaseSequenceResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<LeaseResult> lease = store_->Lease(
      request->sequence_id(), request->lease_id(), absl::Milliseconds(request->ttl_ms()));
  if (lease.ok()) {
    response->set_lease_id(lease->lease_id);
    response->set_expires_unix_ms(absl::ToUnixMillis(lease->expires));
    response->set_found(true);
  }
  if (request->if_stored() && request->lease_id() == 0 && request->ttl_ms() > 0) {
    // A lookup: a miss is an answer (with lease_id 0 the only NOT_FOUND
    // is "not stored").
    lookups_.Add({{"result", lease.ok() ? "hit" : "miss"}}).Increment();
    if (lease.status().code() == absl::StatusCode::kNotFound) {
      return FinishUnary(ctx, "LeaseSequence", start, absl::OkStatus());
    }
  }
  return FinishUnary(ctx, "LeaseSequence", start, lease.status());
}

grpc::ServerUnaryReactor* KvServiceImpl::ReleaseSequence(
    grpc::CallbackServerContext* ctx, const psa::v1::ReleaseSequenceRequest* request,
    psa::v1::ReleaseSequenceResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<uint64_t> freed = store_->Release(request->sequence_id());
  if (freed.ok()) response->set_bytes_freed(*freed);
  return FinishUnary(ctx, "ReleaseSequence", start, freed.status());
}

grpc::ServerUnaryReactor* KvServiceImpl::GetStats(grpc::CallbackServerContext* ctx,
                                                  const psa::v1::GetStatsRequest* request,
                                                  psa::v1::KvStats* response) {
  const absl::Time start = absl::Now();
  const BlockStoreStats s = store_->Stats();
  response->set_sequences(s.sequences);
  response->set_blocks(s.blocks);
  response->set_unique_blocks(s.unique_blocks);
  response->set_bytes_stored(s.bytes_stored);
  response->set_capacity_bytes(s.capacity_bytes);
  response->set_evictions(s.evictions);
  response->set_leases(s.leases);
  return FinishUnary(ctx, "GetStats", start, absl::OkStatus());
}

void ExportBlockStoreMetrics(BlockStore* store, metrics::Registry* registry) {
  auto& bytes = registry->AddGauge("psa_kv_store_bytes", "Memory held by stored blocks").Add();
  auto& capacity =
      registry->AddGauge("psa_kv_store_capacity_bytes", "Store capacity limit").Add();
  auto& blocks = registry->AddGauge("psa_kv_store_blocks",
                                    "Blocks referenced by sequences").Add();
  auto& unique = registry->AddGauge("psa_kv_store_unique_blocks",
                                    "Blocks held in memory (shared content counted once)")
                     .Add();
  auto& sequences = registry->AddGauge("psa_kv_store_sequences", "Stored sequences").Add();
  auto& leases = registry->AddGauge("psa_kv_store_leases", "Active leases").Add();
  auto& usage = registry->AddGauge("psa_kv_store_usage_ratio",
                                   "Stored bytes over capacity (0-1)").Add();
  auto& evictions = registry->AddCounter("psa_kv_store_evictions_total",
                                         "Sequences evicted to make room").Add();
  registry->AddCollector([=, &bytes, &capacity, &blocks, &unique, &sequences, &leases,
                          &usage, &evictions] {
    const BlockStoreStats s = store->Stats();
    bytes.Set(s.bytes_stored);
    capacity.Set(s.capacity_bytes);
    blocks.Set(s.blocks);
    unique.Set(s.unique_blocks);
    sequences.Set(s.sequences);
    leases.Set(s.leases);
    usage.Set(s.capacity_bytes ? double(s.bytes_stored) / s.capacity_bytes : 0.0);
    evictions.Increment(s.evictions - evictions.Value());
  });
}

}  // namespace psa
