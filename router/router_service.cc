#include "router/router_service.h"

#include <functional>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"

namespace psa {
RouterService::Metrics::Metrics(metrics::Registry* r)
    : requests(r->AddCounter("psa_router_requests_total", "Finished generations by status code")),
      ttft(r->AddHistogram("psa_router_time_to_first_token_seconds",
                           "From arrival at the router to the first token relayed",
                           metrics::LatencyBuckets())
               .Add()),
      e2e(r->AddHistogram("psa_router_e2e_request_latency_seconds",
                          "From arrival to the end of the stream", metrics::LatencyBuckets())
              .Add()),
      active(r->AddGauge("psa_router_requests_active", "Generations being relayed").Add()),
      queued(r->AddGauge("psa_router_requests_queued",
                         "Generations admitted and waiting for a relay slot").Add()),
      retries(r->AddCounter("psa_router_retries_total",
                            "Requests sent to another worker before their first token")
                  .Add()),
      resumes(r->AddCounter("psa_router_resumes_total",
                            "Generations continued on another worker after tokens were streamed")
                  .Add()) {
  // Every code exported from the start at 0, so ratios over a range (the
  // dashboards' error stat, the alerts) have a series before the first error.
  for (int code = grpc::StatusCode::OK; code <= grpc::StatusCode::UNAUTHENTICATED; ++code) {
    requests.Add({{"code", GrpcCodeName(static_cast<grpc::StatusCode>(code))}});
  }
}

RouterService::RouterService(WorkerPool* pool, metrics::Registry* registry,
                             RouterOptions options)
    : pool_(pool), options_(options), metrics_(registry) {}

grpc::Status RouterService::Authenticate(const grpc::CallbackServerContext* ctx,
                                         std::string* tenant) {
  if (options_.api_keys == nullptr) return grpc::Status::OK;
  const auto& md = ctx->client_metadata();
  auto get = [&md](const char* key) {
    auto it = md.find(key);
    return it == md.end() ? absl::string_view()
                          : absl::string_view(it->second.data(), it->second.size());
  };
  const absl::string_view value = get("authorization");
  if (!options_.internal_authorization.empty() && value == options_.internal_authorization) {
    if (tenant != nullptr) *tenant = std::string(get("x-psa-tenant"));
    return grpc::Status::OK;
  }
  absl::StatusOr<std::string> t = options_.api_keys->Check(value);
  if (!t.ok()) return ToGrpcStatus(t.status());
  if (tenant != nullptr) *tenant = std::move(*t);
  return grpc::Status::OK;
}

RouterService::~RouterService() {
  absl::MutexLock lock(&mu_);
  auto idle = [this] {
    mu_.AssertHeld();
    return relays_ == 0;
  };
  mu_.Await(absl::Condition(&idle));
}

// A unary call relayed to a healthy worker with the callback API, tried on
// another one when a worker is UNAVAILABLE; finishes the server's reactor
// from the last call's callback and deletes itself.
template <typename Response>
class RouterService::UnaryRelay {
 public:
  // Sends the call to a worker; `done` runs when it ends.
  using Send = std::function<void(WorkerPool::Worker&, grpc::ClientContext*, Response*,
                                  std::function<void(grpc::Status)> done)>;

  static grpc::ServerUnaryReactor* Start(RouterService* service,
                                         grpc::CallbackServerContext* ctx, Response* response,
                                         Send send) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (grpc::Status auth = service->Authenticate(ctx, nullptr); !auth.ok()) {
      reactor->Finish(auth);
      return reactor;
    }
    {
      absl::MutexLock lock(&service->mu_);
      ++service->relays_;
    }
    (new UnaryRelay(service, ctx->deadline(), reactor, response, std::move(send)))->Next();
    return reactor;
  }

 private:
  UnaryRelay(RouterService* service, std::chrono::system_clock::time_point deadline,
             grpc::ServerUnaryReactor* reactor, Response* response, Send send)
      : service_(service), deadline_(deadline), reactor_(reactor), response_(response),
        send_(std::move(send)) {}

  void Next() {
    if (static_cast<int>(tried_.size()) >= service_->options_.max_attempts) {
      return End(status_);
    }
    absl::StatusOr<WorkerPool::WorkerRef> worker = service_->pool_->Acquire(0, tried_);
    if (!worker.ok()) return End(ToGrpcStatus(worker.status()));
    contexts_.push_back(std::make_unique<grpc::ClientContext>());
    contexts_.back()->set_deadline(deadline_);
    WorkerPool::WorkerRef w = *worker;  // the callback's copy keeps it alive for the call
    send_(*w, contexts_.back().get(), response_, [this, w](grpc::Status s) {
      service_->pool_->Release(w.get());
      if (s.error_code() != grpc::StatusCode::UNAVAILABLE) return End(s);
      service_->pool_->ReportFailure(w.get());
      tried_.push_back(w);
      status_ = s;
      Next();
    });
  }

  void End(const grpc::Status& s) {
    reactor_->Finish(s);
    RouterService* const service = service_;
    delete this;
    absl::MutexLock lock(&service->mu_);
    --service->relays_;
  }

  RouterService* const service_;
  const std::chrono::system_clock::time_point deadline_;
  grpc::ServerUnaryReactor* const reactor_;
  Response* const response_;
  const Send send_;
  std::vector<WorkerPool::WorkerRef> tried_;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;  // one per try
  grpc::Status status_{grpc::StatusCode::UNAVAILABLE, "no worker was tried"};
};

grpc::ServerUnaryReactor* RouterService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const psa::v1::TokenizeRequest* request,
                                                  psa::v1::TokenizeResponse* response) {
  return UnaryRelay<psa::v1::TokenizeResponse>::Start(
      this, ctx, response,
      [request](WorkerPool::Worker& w, grpc::ClientContext* c, psa::v1::TokenizeResponse* r,
                std::function<void(grpc::Status)> done) {
        w.stub->async()->Tokenize(c, request, r, std::move(done));
      });
}

grpc::ServerUnaryReactor* RouterService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                      const psa::v1::GetModelInfoRequest* request,
                                                      psa::v1::ModelInfo* response) {
  return UnaryRelay<psa::v1::ModelInfo>::Start(
      this, ctx, response,
      [request](WorkerPool::Worker& w, grpc::ClientContext* c, psa::v1::ModelInfo* r,
                std::function<void(grpc::Status)> done) {
        w.stub->async()->GetModelInfo(c, request, r, std::move(done));
      });
}

}  // namespace psa
