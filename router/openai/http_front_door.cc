#include "router/openai/http_front_door.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <deque>
#include <thread>
#include <vector>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/client_callback.h"
#include "httplib.h"
#include "router/openai/openai_protocol.h"

namespace psa::openai {
namespace {

using nlohmann::json;

// One Generate call on the router, read with the callback API so the HTTP
// thread can wait with a timeout (and look at its client) between messages.
// Thread-safe: gRPC's callbacks and the waiting thread meet under mu_.
class GenerateCall final : public grpc::ClientReadReactor<psa::v1::GenerateResponse> {
 public:
  enum class Event { kMessage, kDone, kTimeout };

  GenerateCall(psa::v1::Generation::Stub* stub, const psa::v1::GenerateRequest& request,
               const std::string& authorization, const std::string& tenant) {
    if (!authorization.empty()) ctx_.AddMetadata("authorization", authorization);
    if (!tenant.empty()) ctx_.AddMetadata("x-psa-tenant", tenant);
    stub->async()->Generate(&ctx_, &request, this);
    StartRead(&incoming_);
    StartCall();
  }
  // Cancels the call if it still runs and waits for gRPC to let go of it.
  ~GenerateCall() override {
    ctx_.TryCancel();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
  }

  // The next message, or the end (status()), or nothing within `timeout`.
  Event Next(absl::Duration timeout, psa::v1::GenerateResponse* message) {
    absl::MutexLock lock(&mu_);
    auto ready = [this] {
      mu_.AssertHeld();
      return !queue_.empty() || done_;
    };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
    if (!queue_.empty()) {
      *message = std::move(queue_.front());
      queue_.pop_front();
      return Event::kMessage;
    }
    return done_ ? Event::kDone : Event::kTimeout;
  }
  void Cancel() { ctx_.TryCancel(); }
  // Valid after kDone.
  grpc::Status status() {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  int64_t retry_after_ms() {
    absl::MutexLock lock(&mu_);
    return retry_after_ms_;
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    {
      absl::MutexLock lock(&mu_);
      queue_.push_back(std::move(incoming_));
    }
    incoming_.Clear();
    StartRead(&incoming_);
  }
  void OnDone(const grpc::Status& status) override {
    int64_t retry = 0;
    const auto& trailers = ctx_.GetServerTrailingMetadata();
    if (auto it = trailers.find("retry-after-ms"); it != trailers.end()) {
      if (!absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &retry)) {
        retry = 0;
      }
    }
    absl::MutexLock lock(&mu_);
    status_ = status;
    retry_after_ms_ = retry;
    done_ = true;
  }

 private:
  grpc::ClientContext ctx_;
  psa::v1::GenerateResponse incoming_;  // owned by gRPC between StartRead and OnReadDone
  absl::Mutex mu_;
  std::deque<psa::v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  int64_t retry_after_ms_ ABSL_GUARDED_BY(mu_) = 0;
};

// httplib's task queue, grown on demand up to `max` threads (its own
// ThreadPool starts all of them at once): an idle router keeps few threads.
// Threads stay once started, for the next burst.
class OnDemandThreadPool final : public httplib::TaskQueue {
 public:
  explicit OnDemandThreadPool(size_t max) : max_(max) {}
  ~OnDemandThreadPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    absl::MutexLock lock(&mu_);
    jobs_.push_back(std::move(fn));
    if (jobs_.size() > idle_ && threads_.size() < max_) {
      threads_.emplace_back([this] { Run(); });
    }
  }
  // Runs the queued jobs, then joins the threads.
  void shutdown() override {
    std::vector<std::thread> threads;
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

 private:
  void Run() {
    absl::MutexLock lock(&mu_);
    auto ready = [this] {
      mu_.AssertHeld();
      return stop_ || !jobs_.empty();
    };
    for (;;) {
      ++idle_;
      mu_.Await(absl::Condition(&ready));
      --idle_;
      if (jobs_.empty()) return;  // stopping, nothing left
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      mu_.Unlock();
      job();
      mu_.Lock();
    }
  }

  const size_t max_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> jobs_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  size_t idle_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

// Whether an HTTP client has gone away while its answer is computed.
// httplib 0.11 (Debian 12's) neither exposes a request's socket nor notices a
// closed peer, so the socket is found once, by its two addresses, among this
// process's descriptors, and polled for the peer's FIN without reading.
// Only valid while the request's handler or content provider runs (the
// socket is httplib's and stays open until then).
class ClientWatch {
 public:
  explicit ClientWatch(const httplib::Request& req)
      : peer_ip_(req.remote_addr), peer_port_(req.remote_port), local_port_(req.local_port) {}

  bool Gone() {
    if (fd_ == -2) fd_ = Find();
    if (fd_ < 0) return false;  // not found: cannot tell, assume present
    pollfd p{fd_, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
  }

 private:
  static bool Matches(const sockaddr_storage& a, const std::string& ip, int port) {
    char text[INET6_ADDRSTRLEN] = {};
    int got_port = -1;
    if (a.ss_family == AF_INET) {
      const auto* v4 = reinterpret_cast<const sockaddr_in*>(&a);
      inet_ntop(AF_INET, &v4->sin_addr, text, sizeof(text));
      got_port = ntohs(v4->sin_port);
    } else if (a.ss_family == AF_INET6) {
      const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&a);
      inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof(text));
      got_port = ntohs(v6->sin6_port);
    }
    return got_port == port && (ip.empty() || ip == text);
  }
  int Find() const {
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return -1;
    int found = -1;
    while (dirent* e = readdir(dir)) {
      int fd = -1;
      if (!absl::SimpleAtoi(e->d_name, &fd) || fd == dirfd(dir)) continue;
      sockaddr_storage peer{}, local{};
      socklen_t peer_len = sizeof(peer), local_len = sizeof(local);
      if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) continue;
      if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0) continue;
      if (Matches(peer, peer_ip_, peer_port_) && Matches(local, "", local_port_)) {
        found = fd;
        break;
      }
    }
    closedir(dir);
    return found;
  }

  const std::string peer_ip_;
  const int peer_port_, local_port_;
  int fd_ = -2;  // -2: not looked up yet; -1: not found
};

// JSON text of `j`; invalid UTF-8 (in a model's name, say) becomes U+FFFD
// rather than an exception.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void SendError(httplib::Response& res, const ApiError& error) {
  res.status = error.http_status;
  if (error.retry_after_s > 0) res.set_header("Retry-After", std::to_string(error.retry_after_s));
  res.set_content(Dump(error.ToJson()), "application/json");
}

std::string Sse(const json& data) { return absl::StrCat("data: ", Dump(data), "\n\n"); }

// What one generation has produced so far, for the non-streamed answer.
struct Accumulated {
  std::string text;
  std::string finish_reason;
  psa::v1::Usage usage;
  void Add(const psa::v1::GenerateResponse& m) {
    text += m.text();
    if (!m.finish_reason().empty()) finish_reason = m.finish_reason();
    if (m.has_usage()) usage = m.usage();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<HttpFrontDoor>> HttpFrontDoor::Start(
    HttpFrontDoorOptions options, std::shared_ptr<grpc::Channel> channel) {
  const size_t colon = options.listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(options.listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_listen=", options.listen, " is not HOST:PORT"));
  }
  const std::string host = options.listen.substr(0, colon);
  std::unique_ptr<HttpFrontDoor> door(new HttpFrontDoor(std::move(options), std::move(channel)));
  if (!door->server_->is_valid()) {
    return absl::InvalidArgumentError(
        "HTTPS: cannot load --tls_cert_file and --tls_key_file (PEM certificate and key)");
  }
  door->Register();
  door->port_ = port == 0 ? door->server_->bind_to_any_port(host)
                          : (door->server_->bind_to_port(host, port) ? port : -1);
  if (door->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", host, ":", port));
  }
  door->thread_ = std::thread([d = door.get()] { d->server_->listen_after_bind(); });
  return door;
}

HttpFrontDoor::HttpFrontDoor(HttpFrontDoorOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(psa::v1::Generation::NewStub(channel_)),
      server_(options_.tls_cert_file.empty()
                  ? std::make_unique<httplib::Server>()
                  : std::make_unique<httplib::SSLServer>(options_.tls_cert_file.c_str(),
                                                         options_.tls_key_file.c_str())) {}

HttpFrontDoor::~HttpFrontDoor() {
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

std::string HttpFrontDoor::ServedModel(psa::v1::ModelInfo* info) {
  {
    absl::MutexLock lock(&mu_);
    if (!model_.empty()) {
      if (info != nullptr) *info = info_;
      return model_;
    }
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  if (!options_.internal_authorization.empty()) {
    ctx.AddMetadata("authorization", options_.internal_authorization);
  }
  psa::v1::ModelInfo got;
  const bool asked = stub_->GetModelInfo(&ctx, psa::v1::GetModelInfoRequest(), &got).ok();
  absl::MutexLock lock(&mu_);
  if (asked) {
    info_ = got;
    model_ = options_.served_model.empty() ? got.served_name() : options_.served_model;
    if (model_.empty()) model_ = got.model_id();  // a worker older than served_name
  } else if (!options_.served_model.empty()) {
    return options_.served_model;  // named by flag: usable before a worker answers
  }
  if (info != nullptr) *info = info_;
  return model_;
}

bool HttpFrontDoor::Authorized(const httplib::Request& req, httplib::Response& res,
                              std::string* tenant_out) {
  if (options_.api_keys == nullptr) return true;
  absl::StatusOr<std::string> tenant =
      options_.api_keys->Check(req.get_header_value("Authorization"));
  if (tenant.ok()) {
    if (tenant_out != nullptr) *tenant_out = std::move(*tenant);
    return true;
  }
  SendError(res, FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                             std::string(tenant.status().message()))));
  res.set_header("WWW-Authenticate", "Bearer");
  return false;
}

void HttpFrontDoor::Register() {
  httplib::Server& s = *server_;
  const int threads = std::max(1, options_.threads);
  s.new_task_queue = [threads] { return new OnDemandThreadPool(threads); };
  s.set_payload_max_length(options_.max_body_bytes);
  s.set_keep_alive_max_count(1000);
  // Statuses httplib answers itself (413, 404 of unknown paths, 400 of
  // malformed HTTP) in OpenAI's error shape.
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e;
    e.http_status = res.status;
    e.message = res.status == 413   ? "the request body is too large"
                : res.status == 404 ? absl::StrCat("no route for ", req.method, " ", req.path)
                                    : absl::StrCat("HTTP status ", res.status);
    if (res.status >= 500) e.type = "server_error";
    res.set_content(Dump(e.ToJson()), "application/json");
  });

  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool ok = !options_.ready || options_.ready();
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "ok\n" : "no healthy worker\n", "text/plain");
  });

  auto models = [this](const httplib::Request& req, httplib::Response& res) {
    if (!Authorized(req, res, nullptr)) return;
    psa::v1::ModelInfo info;
    const std::string model = ServedModel(&info);
    if (model.empty()) {
      ApiError e = FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                               "no worker answered: the model is not known yet"));
      return SendError(res, e);
    }
    json list = ModelList(model, info, /*created=*/0);
    if (req.matches.size() > 1) {  // /v1/models/{id}
      if (req.matches[1].str() != model) {
        ApiError e;
        e.http_status = 404;
        e.code = "model_not_found";
        e.param = "model";
        e.message = absl::StrCat("The model `", req.matches[1].str(), "` does not exist");
        return SendError(res, e);
      }
      return res.set_content(Dump(list["data"][0]), "application/json");
    }
    res.set_content(Dump(list), "application/json");
  };
  s.Get("/v1/models", models);
  s.Get(R"(/v1/models/(.+))", models);

  auto generate = [this](Endpoint endpoint, const httplib::Request& req,
                         httplib::Response& res) {
    std::string tenant;
    if (!Authorized(req, res, &tenant)) return;
    const std::string model = ServedModel();
    if (model.empty()) {
      return SendError(res, FromGrpcStatus(grpc::Status(
                                grpc::StatusCode::UNAVAILABLE,
                                "no worker answered: the model is not known yet")));
    }
    ApiError error;
    std::optional<ParsedRequest> parsed = ParseRequest(endpoint, req.body, model, &error);
    if (!parsed) return SendError(res, error);

    auto call = std::make_shared<GenerateCall>(stub_.get(), parsed->request,
                                               options_.internal_authorization, tenant);
    auto client = std::make_shared<ClientWatch>(req);
    const ResponseHeader header{endpoint, NewResponseId(endpoint),
                                absl::ToUnixSeconds(absl::Now()), model};
    const absl::Duration poll = options_.poll_interval;
    // Until the first message (streams) or the whole answer: nothing is
    // sent, so a failure keeps its HTTP status; the client is watched.
    Accumulated acc;
    std::deque<psa::v1::GenerateResponse> first;
    absl::Time next_check = absl::Now() + poll;
    for (;;) {
      psa::v1::GenerateResponse m;
      const GenerateCall::Event ev = call->Next(poll, &m);
      if (absl::Now() >= next_check) {  // tokens may flow without a pause: check by time
        next_check = absl::Now() + poll;
        if (client->Gone()) {
          call->Cancel();  // nobody to answer: stop the generation
          res.status = 499;
          return;
        }
      }
      if (ev == GenerateCall::Event::kTimeout) continue;
      if (ev == GenerateCall::Event::kDone) {
        if (!call->status().ok()) {
          return SendError(res, FromGrpcStatus(call->status(), call->retry_after_ms()));
        }
        break;
      }
      acc.Add(m);
      if (parsed->stream) {
        first.push_back(std::move(m));
        break;
      }
      if (!acc.finish_reason.empty()) break;
    }
    if (!parsed->stream) {
      return res.set_content(
          Dump(CompleteResponse(header, acc.text, acc.finish_reason, acc.usage)),
          "application/json");
    }

    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");  // no proxy buffering of the stream
    const bool include_usage = parsed->include_usage;
    auto is_first = std::make_shared<bool>(true);
    auto pending = std::make_shared<std::deque<psa::v1::GenerateResponse>>(std::move(first));
    res.set_chunked_content_provider(
        "text/event-stream",
        [call, client, header, include_usage, is_first, pending, poll](size_t,
                                                                       httplib::DataSink& sink) {
          psa::v1::GenerateResponse msg;
          GenerateCall::Event e;
          if (!pending->empty()) {
            msg = std::move(pending->front());
            pending->pop_front();
            e = GenerateCall::Event::kMessage;
          } else {
            e = call->Next(poll, &msg);
          }
          std::string out;
          if (e == GenerateCall::Event::kTimeout) {
            if (!client->Gone()) return true;  // still there: wait on
            call->Cancel();
            return false;
          }
          if (e == GenerateCall::Event::kMessage) {
            if (msg.text().empty() && msg.finish_reason().empty() && !*is_first) return true;
            out = Sse(StreamChunk(header, msg.text(), msg.finish_reason(), *is_first,
                                  include_usage));
            *is_first = false;
            if (!msg.finish_reason().empty()) {
              if (include_usage) out += Sse(UsageChunk(header, msg.usage()));
              out += "data: [DONE]\n\n";
            }
          } else if (!call->status().ok()) {  // failed after the first token
            out = Sse(FromGrpcStatus(call->status(), call->retry_after_ms()).ToJson());
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            call->Cancel();  // the client went away: stop the generation
            return false;
          }
          if (e == GenerateCall::Event::kDone || !msg.finish_reason().empty()) sink.done();
          return true;
        });
  };
  s.Post("/v1/completions", [generate](const httplib::Request& req, httplib::Response& res) {
    generate(Endpoint::kCompletions, req, res);
  });
  s.Post("/v1/chat/completions", [generate](const httplib::Request& req, httplib::Response& res) {
    generate(Endpoint::kChatCompletions, req, res);
  });
}

}  // namespace psa::openai
