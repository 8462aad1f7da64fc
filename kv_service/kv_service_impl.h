// KvServiceImpl: the psa.v1.KvService gRPC callback service over a
// BlockStore, with its Prometheus metrics.
#ifndef PSA_KV_SERVICE_KV_SERVICE_IMPL_H_
#define PSA_KV_SERVICE_KV_SERVICE_IMPL_H_

#include <cstdint>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "kv_service/block_store.h"
#include "kv_service/fetch_wire.h"
#include "proto/psa/v1/kv_service.grpc.pb.h"

namespace psa {

// The callback service with FetchBlocks as a raw method (byte buffers), so
// that block bytes go from the store to the socket without copies; see
// fetch_wire.h. (KvService::CallbackService, but for that one method.)
using KvServiceBase = psa::v1::KvService::WithCallbackMethod_OpenSequence<
    psa::v1::KvService::WithCallbackMethod_WriteBlocks<
        psa::v1::KvService::WithRawCallbackMethod_FetchBlocks<
            psa::v1::KvService::WithCallbackMethod_GetMetadata<
                psa::v1::KvService::WithCallbackMethod_LeaseSequence<
                    psa::v1::KvService::WithCallbackMethod_ReleaseSequence<
                        psa::v1::KvService::WithCallbackMethod_GetStats<
                            psa::v1::KvService::Service>>>>>>>;

class KvServiceImpl final : public KvServiceBase {
 public:
  // `store` and `registry` must outlive the service. `max_message_bytes`
  // caps one fetch response.
  KvServiceImpl(BlockStore* store, metrics::Registry* registry, uint64_t max_message_bytes);

  // Graceful shutdown, step 1: every fetch stream answers the requests it
  // has read, then ends with UNAVAILABLE so clients move on; new streams are
  // refused. Call before grpc::Server::Shutdown.
  void Drain();

  grpc::ServerUnaryReactor* OpenSequence(grpc::CallbackServerContext* ctx,
                                         const psa::v1::OpenSequenceRequest* request,
                                         psa::v1::OpenSequenceResponse* response) override;
  grpc::ServerReadReactor<psa::v1::WriteBlocksRequest>* WriteBlocks(
      grpc::CallbackServerContext* ctx, psa::v1::WriteBlocksResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* FetchBlocks(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerWriteReactor<psa::v1::LayerMetadata>* GetMetadata(
      grpc::CallbackServerContext* ctx, const psa::v1::GetMetadataRequest* request) override;
  grpc::ServerUnaryReactor* LeaseSequence(grpc::CallbackServerContext* ctx,
                                          const psa::v1::LeaseSequenceRequest* request,
                                          psa::v1::LeaseSequenceResponse* response) override;
  grpc::ServerUnaryReactor* ReleaseSequence(grpc::CallbackServerContext* ctx,
                                            const psa::v1::ReleaseSequenceRequest* request,
                                            psa::v1::ReleaseSequenceResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const psa::v1::GetStatsRequest* request,
                                     psa::v1::KvStats* response) override;

 private:
  class FetchReactor;
  class WriteReactor;
  class MetadataReactor;

  // Answers each query of a fetch request, appending to `answers`; errors
  // go into the answers.
  void AnswerFetch(grpc::ByteBuffer* request, std::vector<EncodedAnswer>* answers);
  // Counts an RPC's outcome and duration.
  void Record(const char* method, const grpc::Status& status, absl::Time start);
  grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const char* method,
                                        absl::Time start, const absl::Status& status);

  BlockStore* const store_;
  const uint64_t max_message_bytes_;

  metrics::Family<metrics::Counter>& rpcs_;
  metrics::Family<metrics::Histogram>& rpc_seconds_;
  metrics::Family<metrics::Gauge>& active_streams_;
  metrics::Counter& fetch_queries_;
  metrics::Counter& fetch_blocks_;
  metrics::Counter& fetch_bytes_;
  metrics::Histogram& fetch_message_seconds_;
  metrics::Counter& write_blocks_;
  metrics::Counter& write_bytes_;
  metrics::Family<metrics::Counter>& lookups_;  // by result: hit, miss

  absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<FetchReactor*> fetch_streams_ ABSL_GUARDED_BY(mu_);
};

// Registers the store's gauges (bytes, blocks, sequences, capacity,
// evictions, leases) with `registry`, read on every scrape.
void ExportBlockStoreMetrics(BlockStore* store, metrics::Registry* registry);

}  // namespace psa

#endif  // PSA_KV_SERVICE_KV_SERVICE_IMPL_H_
