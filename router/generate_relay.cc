// RouterService::Generate: one relayed generation per Relay, on gRPC's
// callback API end to end. The Relay is the server-side stream writer; each
// try on a worker is a WorkerCall (a ClientReadReactor) whose messages the
// Relay pushes on to the client and whose end decides what comes next (done,
// another worker before the first token, a signed resume after it). Queued
// relays wait in RouterService::waiting_ and are begun by the relay whose
// slot they take, so no relay ever holds or blocks a thread.
//
// Threading: a relay's own state (tries, tokens so far) is touched by one
// callback at a time — its constructor or the relay ahead of it in the
// queue begins it, then its calls' reactions follow one another — so it
// needs no lock; mu_ guards only what the client's cancellation (any
// thread) shares with them.
#include <atomic>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/generate_stream_writer.h"
#include "common/grpc_status.h"
#include "router/router_service.h"

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

class RouterService::Relay final : public GenerateStreamWriter {
 public:
  Relay(RouterService* service, grpc::CallbackServerContext* ctx, const GenerateRequest& request);

  // Starts the first try; the relay holds a slot.
  void Begin();
  // From the WorkerCall in progress.
  void OnMessage(const GenerateResponse& message);
  void OnCallDone(WorkerCall* call, grpc::Status status);

 private:
  void OnClientGone() override;
  // Starts the next try, or ends the generation when none is left.
  void NextTry();
  // Ends the generation with `status`: counted, sent, slot passed on.
  void End(const grpc::Status& status, bool held_slot);

  // Why the call ended when the client is gone: its deadline passed (gRPC
  // cancels the call then), or it cancelled.
  grpc::Status ClientGoneStatus(bool queued) const {
    if (absl::Now() + kDeadlineSlack >= absl::FromChrono(deadline_)) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          queued ? "the deadline passed while the request waited in the "
                                   "router's queue"
                                 : "the request's deadline passed");
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
  }

  friend class RouterService;  // PassSlot takes a relay off the queue

  RouterService* const service_;
  GenerateRequest request_;  // set up in the constructor, then read only
  const std::chrono::system_clock::time_point deadline_;
  const absl::Time start_;
  std::list<Relay*>::iterator queue_entry_;  // valid while in_queue_
  bool in_queue_ = false;                    // guarded by service_->mu_

  // One callback at a time (see the file comment).
  const uint64_t affinity_;
  int tries_ = 0;
  std::vector<WorkerPool::WorkerRef> tried_;  // keeps them alive for the exclusion
  std::vector<uint32_t> generated_;
  uint64_t text_bytes_ = 0;
  bool finished_ = false;
  grpc::Status last_failure_{grpc::StatusCode::UNAVAILABLE, "no worker was tried"};

  absl::Mutex mu_;  // the worker call in progress and whether the client left
  WorkerCall* call_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

// One try of a relay on one worker. Reference counted: gRPC's reference is
// dropped at OnDone, after telling the relay how the call ended; the relay
// takes one to cancel the call without holding its lock (TryCancel may run
// the call's reactions on the calling thread).
class RouterService::WorkerCall final : public grpc::ClientReadReactor<GenerateResponse> {
 public:
  WorkerCall(Relay* relay, WorkerPool::WorkerRef worker, GenerateRequest request,
             std::chrono::system_clock::time_point deadline)
      : relay_(relay), worker_(std::move(worker)), request_(std::move(request)) {
    ctx_.set_deadline(deadline);
  }
  grpc::ClientContext* context() { return &ctx_; }
  const WorkerPool::WorkerRef& worker() const { return worker_; }
  void Start() {
    worker_->stub->async()->Generate(&ctx_, &request_, this);
    StartRead(&message_);
    StartCall();  // may end the call at once: touch nothing after it
  }
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }
  void Cancel() { ctx_.TryCancel(); }

 private:
  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    relay_->OnMessage(message_);
    StartRead(&message_);
  }
  void OnDone(const grpc::Status& status) override {
    relay_->OnCallDone(this, status);
    Unref();
  }

  Relay* const relay_;
  const WorkerPool::WorkerRef worker_;  // valid for the call even if the pool forgets it
  const GenerateRequest request_;
  grpc::ClientContext ctx_;
  GenerateResponse message_;
  std::atomic<int> refs_{1};
};

RouterService::Relay::Relay(RouterService* service, grpc::CallbackServerContext* ctx,
                            const GenerateRequest& request)
    : GenerateStreamWriter(/*producers=*/1),  // the relay's own reference, dropped by End
      service_(service),
      request_(request),
      deadline_(ctx->deadline()),
      start_(absl::Now()),
      affinity_(PromptAffinity(request)) {
  std::string tenant;
  if (grpc::Status auth = service_->Authenticate(ctx, &tenant); !auth.ok()) {
    service_->metrics_.requests.Add({{"code", "UNAUTHENTICATED"}}).Increment();
    Close(auth);
    Unref();
    return;
  }
  // Prefix reuse scoped by the key's tenant; a client's salt only narrows
  // it and can never name another tenant's scope.
  if (!tenant.empty()) {
    request_.set_cache_salt(absl::StrCat("tenant/", tenant, "/", request.cache_salt()));
  } else if (!request.cache_salt().empty()) {
    request_.set_cache_salt(absl::StrCat("client/", request.cache_salt()));
  }
  if (request.has_resume()) {
    service_->metrics_.requests.Add({{"code", "INVALID_ARGUMENT"}}).Increment();
    Close(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       "resume is set by the router itself when it continues a generation on "
                       "another worker; clients must not set it"));
    Unref();
    return;
  }
  bool admitted = false, run_now = false;
  {
    absl::MutexLock lock(&service_->mu_);
    const RouterOptions& o = service_->options_;
    admitted = service_->running_ + service_->queued_ < o.max_inflight + o.max_queued;
    if (admitted) {
      ++service_->relays_;
      // A free slot means nobody is queued: slots pass to the queue first.
      run_now = service_->running_ < o.max_inflight;
      if (run_now) {
        ++service_->running_;
        service_->metrics_.active.Add(1);
      } else {
        ++service_->queued_;
        service_->metrics_.queued.Add(1);
        queue_entry_ = service_->waiting_.insert(service_->waiting_.end(), this);
        in_queue_ = true;
      }
    }
  }
  if (!admitted) {
    ctx->AddTrailingMetadata("retry-after-ms", "1000");
    service_->metrics_.requests.Add({{"code", "RESOURCE_EXHAUSTED"}}).Increment();
    Close(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                       absl::StrCat("the router is at capacity (", service_->options_.max_inflight,
                                    " generations running, ", service_->options_.max_queued,
                                    " queued); retry in about a second")));
    Unref();
    return;
  }
  if (run_now) Begin();
}

void RouterService::Relay::Begin() { NextTry(); }

void RouterService::Relay::OnClientGone() {
  bool dequeued = false;
  {
    absl::MutexLock lock(&service_->mu_);
    if (in_queue_) {  // still waiting for a slot: leave the queue now
      service_->waiting_.erase(queue_entry_);
      in_queue_ = false;
      --service_->queued_;
      service_->metrics_.queued.Add(-1);
      dequeued = true;
    }
  }
  if (dequeued) {
    End(ClientGoneStatus(/*queued=*/true), /*held_slot=*/false);
    return;
  }
  WorkerCall* call;
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    call = call_;
    if (call != nullptr) call->Ref();
  }
  if (call != nullptr) {
    call->Cancel();
    call->Unref();
  }
}

void RouterService::Relay::NextTry() {
  if (tries_ >= service_->options_.max_attempts) {
    End(last_failure_, /*held_slot=*/true);
    return;
  }
  absl::StatusOr<WorkerPool::WorkerRef> worker = service_->pool_->Acquire(affinity_, tried_);
  if (!worker.ok()) {
    End(ToGrpcStatus(worker.status()), /*held_slot=*/true);
    return;
  }
  GenerateRequest request = request_;
  std::string signature;
  if (!generated_.empty()) {  // continue where the failed worker stopped
    const ResumeAuth* auth = service_->options_.resume_auth;
    if (auth == nullptr) {  // the workers would refuse an unsigned resume
      service_->pool_->Release(worker->get());
      End(grpc::Status(last_failure_.error_code(),
                       absl::StrCat(last_failure_.error_message(), " (after ", generated_.size(),
                                    " tokens; the router cannot resume on another worker "
                                    "without --resume_secret_file)")),
          /*held_slot=*/true);
      return;
    }
    request.mutable_resume()->mutable_token_ids()->Add(generated_.begin(), generated_.end());
    request.mutable_resume()->set_text_bytes(text_bytes_);
    signature = auth->Sign(request);
    service_->metrics_.resumes.Increment();
  } else if (tries_ > 0) {
    service_->metrics_.retries.Increment();
  }
  ++tries_;
  auto* call = new WorkerCall(this, *worker, std::move(request), deadline_);
  if (!signature.empty()) call->context()->AddMetadata(ResumeAuth::kMetadataKey, signature);
  bool cancelled;
  {
    absl::MutexLock lock(&mu_);
    cancelled = cancelled_;
    if (!cancelled) call_ = call;
  }
  if (cancelled) {
    service_->pool_->Release(worker->get());
    delete call;  // never started
    End(ClientGoneStatus(/*queued=*/false), /*held_slot=*/true);
    return;
  }
  call->Start();
}

void RouterService::Relay::OnMessage(const GenerateResponse& message) {
  if (generated_.empty() && message.token_ids_size() > 0) {
    service_->metrics_.ttft.Observe(absl::ToDoubleSeconds(absl::Now() - start_));
  }
  generated_.insert(generated_.end(), message.token_ids().begin(), message.token_ids().end());
  text_bytes_ += message.text().size();
  if (!message.finish_reason().empty()) finished_ = true;
  Push(message);
}

void RouterService::Relay::OnCallDone(WorkerCall* call, grpc::Status status) {
  const WorkerPool::WorkerRef worker = call->worker();  // the call may go before we are done
  {
    absl::MutexLock lock(&mu_);
    call_ = nullptr;
    if (cancelled_) status = ClientGoneStatus(/*queued=*/false);
  }
  service_->pool_->Release(worker.get());
  if (finished_) {  // the last message came: done, whatever the status says
    End(status, /*held_slot=*/true);
    return;
  }
  if (status.ok()) {  // the stream ended without its last message
    status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker's stream broke off");
  }
  if (!WorthAnotherWorker(status)) {
    End(status, /*held_slot=*/true);
    return;
  }
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    service_->pool_->ReportFailure(worker.get());
  }
  tried_.push_back(worker);
  last_failure_ = status;
  NextTry();
}

void RouterService::Relay::End(const grpc::Status& status, bool held_slot) {
  service_->metrics_.requests.Add({{"code", GrpcCodeName(status.error_code())}}).Increment();
  if (held_slot) service_->metrics_.e2e.Observe(absl::ToDoubleSeconds(absl::Now() - start_));
  Close(status);
  Relay* next = nullptr;
  {
    absl::MutexLock lock(&service_->mu_);
    if (held_slot) next = service_->PassSlot();
    --service_->relays_;  // `next` keeps the count above zero while it runs
  }
  if (next != nullptr) next->Begin();
  Unref();
}

RouterService::Relay* RouterService::PassSlot() {
  if (waiting_.empty()) {
    --running_;
    metrics_.active.Add(-1);
    return nullptr;
  }
  Relay* next = waiting_.front();
  waiting_.pop_front();
  next->in_queue_ = false;
  --queued_;
  metrics_.queued.Add(-1);
  return next;
}

grpc::ServerWriteReactor<GenerateResponse>* RouterService::Generate(
    grpc::CallbackServerContext* ctx, const GenerateRequest* request) {
  return new Relay(this, ctx, *request);
}

}  // namespace psa
