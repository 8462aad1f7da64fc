#include "router/router_service.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "api/generate_stream_writer.h"
#include "common/grpc_status.h"

namespace psa {
namespace {

using psa::v1::GenerateRequest;
using psa::v1::GenerateResponse;

// gRPC cancels a call when its deadline passes; a cancellation this close
// to the deadline (or after it) is the deadline's doing.
constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(20);

bool WorthAnotherWorker(const grpc::Status& s) {
  // The worker is gone or full; anything else is the request's own fault.
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
         s.error_code() == grpc::StatusCode::INTERNAL ||
         s.error_code() == grpc::StatusCode::UNKNOWN;
}

}  // namespace

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
                  .Add()) {}

// One generation: a relay thread runs the worker call(s) with the sync API
// and pushes their messages to the client through the stream writer. Lives
// until both gRPC (OnDone) and the relay thread are done with it.
class RouterService::Relay final : public GenerateStreamWriter {
 public:
  Relay(RouterService* service, grpc::CallbackServerContext* ctx, const GenerateRequest& request)
      : GenerateStreamWriter(/*producers=*/1),  // the relay thread
        service_(service),
        request_(request),
        deadline_(ctx->deadline()),
        start_(absl::Now()) {
    if (request.has_resume()) {
      service_->metrics_.requests.Add({{"code", "INVALID_ARGUMENT"}}).Increment();
      Close(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         "resume is set by the router itself when it continues a generation on "
                         "another worker; clients must not set it"));
      Unref();  // no relay thread
      return;
    }
    {
      absl::MutexLock lock(&service_->mu_);
      const RouterOptions& o = service_->options_;
      admitted_ = service_->running_ + service_->queued_ < o.max_inflight + o.max_queued;
      if (admitted_) {
        ++service_->queued_;
        ++service_->relays_;
      }
    }
    if (!admitted_) {
      ctx->AddTrailingMetadata("retry-after-ms", "1000");
      service_->metrics_.requests.Add({{"code", "RESOURCE_EXHAUSTED"}}).Increment();
      Close(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                         absl::StrCat("the router is at capacity (",
                                      service_->options_.max_inflight, " generations running, ",
                                      service_->options_.max_queued,
                                      " queued); retry in about a second")));
      Unref();  // no relay thread
      return;
    }
    service_->metrics_.queued.Add(1);
    std::thread([this] { Run(); }).detach();
  }

 private:
  void OnClientGone() override {
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      if (worker_ctx_ != nullptr) worker_ctx_->TryCancel();
    }
    absl::MutexLock wake(&service_->mu_);  // a queued relay re-checks its wait
  }

  // Waits (queued) for a relay slot; false if the deadline passed or the
  // client left first.
  bool TakeSlot() {
    absl::MutexLock lock(&service_->mu_);
    auto ready = [this] {
      service_->mu_.AssertHeld();
      absl::MutexLock own(&mu_);
      return service_->running_ < service_->options_.max_inflight || cancelled_;
    };
    const bool got = service_->mu_.AwaitWithDeadline(absl::Condition(&ready),
                                                     absl::FromChrono(deadline_));
    --service_->queued_;
    service_->metrics_.queued.Add(-1);
    absl::MutexLock own(&mu_);
    if (!got || cancelled_) return false;
    ++service_->running_;
    service_->metrics_.active.Add(1);
    return true;
  }

  // Why the call ended when the client is gone: its deadline passed (gRPC
  // cancels the call then), or it cancelled.
  grpc::Status ClientGoneStatus() const {
    if (absl::Now() + kDeadlineSlack >= absl::FromChrono(deadline_)) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
  }

  void Run() {
    if (!TakeSlot()) {
      const grpc::Status s = cancelled()
          ? ClientGoneStatus()
          : grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                         "the deadline passed while the request waited in the router's queue");
      service_->metrics_.requests.Add({{"code", GrpcCodeName(s.error_code())}}).Increment();
      Close(s);
      ReleaseRelay(/*held_slot=*/false);
      return;
    }
    const uint64_t affinity = PromptAffinity(request_);
    std::vector<WorkerPool::Worker*> tried;
    std::vector<uint32_t> generated;
    uint64_t text_bytes = 0;
    bool finished = false;
    grpc::Status status(grpc::StatusCode::UNAVAILABLE, "no worker was tried");
    for (int attempt = 0; attempt < service_->options_.max_attempts && !finished; ++attempt) {
      absl::StatusOr<WorkerPool::Worker*> worker = service_->pool_->Acquire(affinity, tried);
      if (!worker.ok()) {
        status = ToGrpcStatus(worker.status());
        break;
      }
      GenerateRequest request = request_;
      grpc::ClientContext ctx;
      ctx.set_deadline(deadline_);
      if (!generated.empty()) {  // continue where the failed worker stopped
        const ResumeAuth* auth = service_->options_.resume_auth;
        if (auth == nullptr) {  // the workers would refuse an unsigned resume
          service_->pool_->Release(*worker);
          status = grpc::Status(status.error_code(),
                                absl::StrCat(status.error_message(), " (after ",
                                             generated.size(), " tokens; the router cannot "
                                             "resume on another worker without "
                                             "--resume_secret_file)"));
          break;
        }
        request.mutable_resume()->mutable_token_ids()->Add(generated.begin(), generated.end());
        request.mutable_resume()->set_text_bytes(text_bytes);
        ctx.AddMetadata(ResumeAuth::kMetadataKey, auth->Sign(request));
        service_->metrics_.resumes.Increment();
      } else if (attempt > 0) {
        service_->metrics_.retries.Increment();
      }
      {
        absl::MutexLock lock(&mu_);
        if (cancelled_) {
          service_->pool_->Release(*worker);
          status = ClientGoneStatus();
          break;
        }
        worker_ctx_ = &ctx;
      }
      auto reader = (*worker)->stub->Generate(&ctx, request);
      GenerateResponse message;
      while (reader->Read(&message)) {
        if (generated.empty() && message.token_ids_size() > 0) {
          service_->metrics_.ttft.Observe(absl::ToDoubleSeconds(absl::Now() - start_));
        }
        generated.insert(generated.end(), message.token_ids().begin(), message.token_ids().end());
        text_bytes += message.text().size();
        if (!message.finish_reason().empty()) finished = true;
        Push(message);
      }
      status = reader->Finish();
      {
        absl::MutexLock lock(&mu_);
        worker_ctx_ = nullptr;
        if (cancelled_) status = ClientGoneStatus();
      }
      service_->pool_->Release(*worker);
      if (finished && status.ok()) break;
      if (status.ok()) {  // the stream ended without its last message
        status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker's stream broke off");
      }
      if (!WorthAnotherWorker(status)) break;
      if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
        service_->pool_->ReportFailure(*worker);
      }
      tried.push_back(*worker);
    }
    if (finished && status.ok()) status = grpc::Status::OK;
    service_->metrics_.requests.Add({{"code", GrpcCodeName(status.error_code())}}).Increment();
    service_->metrics_.e2e.Observe(absl::ToDoubleSeconds(absl::Now() - start_));
    Close(status);
    ReleaseRelay(/*held_slot=*/true);
  }

  bool cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }

  void ReleaseRelay(bool held_slot) {
    {
      absl::MutexLock lock(&service_->mu_);
      if (held_slot) {
        --service_->running_;
        service_->metrics_.active.Add(-1);
      }
      --service_->relays_;
    }
    Unref();
  }

  RouterService* const service_;
  const GenerateRequest request_;
  bool admitted_ = false;
  const std::chrono::system_clock::time_point deadline_;
  const absl::Time start_;

  absl::Mutex mu_;  // the worker call in progress and whether the client left
  grpc::ClientContext* worker_ctx_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

RouterService::RouterService(WorkerPool* pool, metrics::Registry* registry,
                             RouterOptions options)
    : pool_(pool), options_(options), metrics_(registry) {}

RouterService::~RouterService() {
  absl::MutexLock lock(&mu_);
  auto idle = [this] {
    mu_.AssertHeld();
    return relays_ == 0;
  };
  mu_.Await(absl::Condition(&idle));
}

grpc::ServerWriteReactor<GenerateResponse>* RouterService::Generate(
    grpc::CallbackServerContext* ctx, const GenerateRequest* request) {
  return new Relay(this, ctx, *request);
}

template <typename Call>
grpc::Status RouterService::OnAnyWorker(const grpc::CallbackServerContext* ctx, Call call) {
  std::vector<WorkerPool::Worker*> tried;
  grpc::Status status(grpc::StatusCode::UNAVAILABLE, "no worker was tried");
  for (int attempt = 0; attempt < options_.max_attempts; ++attempt) {
    absl::StatusOr<WorkerPool::Worker*> worker = pool_->Acquire(0, tried);
    if (!worker.ok()) return ToGrpcStatus(worker.status());
    grpc::ClientContext worker_ctx;
    worker_ctx.set_deadline(ctx->deadline());
    status = call(**worker, &worker_ctx);
    pool_->Release(*worker);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE) return status;
    pool_->ReportFailure(*worker);
    tried.push_back(*worker);
  }
  return status;
}

grpc::ServerUnaryReactor* RouterService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const psa::v1::TokenizeRequest* request,
                                                  psa::v1::TokenizeResponse* response) {
  const grpc::Status s = OnAnyWorker(ctx, [&](WorkerPool::Worker& w, grpc::ClientContext* c) {
    return w.stub->Tokenize(c, *request, response);
  });
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(s);
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                      const psa::v1::GetModelInfoRequest* request,
                                                      psa::v1::ModelInfo* response) {
  const grpc::Status s = OnAnyWorker(ctx, [&](WorkerPool::Worker& w, grpc::ClientContext* c) {
    return w.stub->GetModelInfo(c, *request, response);
  });
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(s);
  return reactor;
}

}  // namespace psa
