// RouterService: the public psa.v1.Generation front door. Picks a worker
// (WorkerPool), relays its token stream, and hides worker failures: a
// request that fails before its first token is retried on another worker;
// one that fails after tokens were streamed resumes on another worker from
// the tokens so far (GenerateRequest.resume), so the client sees one
// uninterrupted, duplicate-free stream.
//
// Every relay runs on gRPC's callback API end to end (router/generate_relay.cc):
// the server-side stream writer is fed by a ClientReadReactor on the worker,
// so a relayed stream holds no thread of its own, only its reactors.
//
// Ownership: the service borrows the pool, the registry and the resume auth,
// which must outlive it. Each relay owns itself (deleted when gRPC and the
// relay are both done with it). Thread-safe: gRPC calls the handlers from
// any of its threads; the destructor waits for every relay to finish.
#ifndef PSA_ROUTER_ROUTER_SERVICE_H_
#define PSA_ROUTER_ROUTER_SERVICE_H_

#include <list>

#include "api/resume_auth.h"
#include "common/metrics.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "common/api_keys.h"
#include "router/worker_pool.h"

namespace psa {

struct RouterOptions {
  int max_inflight = 256;  // generations relayed at once
  int max_queued = 256;    // waiting for one of those slots; more get RESOURCE_EXHAUSTED
  int max_attempts = 3;    // workers tried per request (first try included)
  // Signs the resumes the router sends after a worker failed mid-stream;
  // null: such a generation fails instead. Must outlive the service.
  const ResumeAuth* resume_auth = nullptr;
  // The keys clients must present ("authorization: Bearer KEY" metadata);
  // null: no key needed. Must outlive the service.
  ApiKeys* api_keys = nullptr;
  // Accepted besides the keys: the router's own HTTP front door, which
  // checks its clients' keys itself. A random secret that never leaves the
  // process; empty: none.
  std::string internal_authorization;
};

class RouterService final : public psa::v1::Generation::CallbackService {
 public:
  RouterService(WorkerPool* pool, metrics::Registry* registry, RouterOptions options);
  ~RouterService() override;  // waits for relays to finish

  grpc::ServerWriteReactor<psa::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const psa::v1::GenerateRequest* request) override;
  // OK, or UNAUTHENTICATED saying what to send, for a call's metadata;
  // `tenant` (may be null) gets the key's tenant ("" without one). Calls
  // with the internal authorization name their tenant in "x-psa-tenant".
  grpc::Status Authenticate(const grpc::CallbackServerContext* ctx, std::string* tenant);

  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const psa::v1::TokenizeRequest* request,
                                     psa::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const psa::v1::GetModelInfoRequest* request,
                                         psa::v1::ModelInfo* response) override;

 private:
  class Relay;       // one relayed generation (generate_relay.cc)
  class WorkerCall;  // one of its calls to a worker
  template <typename Response>
  class UnaryRelay;  // a Tokenize or GetModelInfo call
  struct Metrics {
    explicit Metrics(metrics::Registry* r);
    metrics::Family<metrics::Counter>& requests;
    metrics::Histogram& ttft;
    metrics::Histogram& e2e;
    metrics::Gauge& active;
    metrics::Gauge& queued;
    metrics::Counter& retries;
    metrics::Counter& resumes;
  };
  // Hands a finished relay's slot to the first queued one (returned, to be
  // begun by the caller without the lock) or frees it.
  Relay* PassSlot() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  WorkerPool* const pool_;
  const RouterOptions options_;
  Metrics metrics_;
  absl::Mutex mu_;
  int relays_ ABSL_GUARDED_BY(mu_) = 0;   // generations and unary calls in flight
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // holding a slot
  int queued_ ABSL_GUARDED_BY(mu_) = 0;   // admitted, waiting for a slot
  std::list<Relay*> waiting_ ABSL_GUARDED_BY(mu_);  // those, oldest first
};

}  // namespace psa

#endif  // PSA_ROUTER_ROUTER_SERVICE_H_
