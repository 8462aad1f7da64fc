#include "client/psa_client.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace psa::client {
namespace {

// gRPC retries a call until it is committed — for Generate, until the first
// message arrives — so a failed attempt never duplicates streamed tokens.
constexpr char kServiceConfig[] = R"({
  "methodConfig": [{
    "name": [{"service": "psa.v1.Generation"}],
    "retryPolicy": {
      "maxAttempts": MAX_ATTEMPTS,
      "initialBackoff": "0.1s",
      "maxBackoff": "2s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
})";

absl::Status FromGrpc(const grpc::Status& s, const std::string& target) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(s.error_message(), " (server ", target, ")"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(ClientOptions options) {
  if (options.target.empty()) return absl::InvalidArgumentError("no target given (host:port)");
  if (options.max_attempts < 1 || options.max_attempts > 5) {
    return absl::InvalidArgumentError("max_attempts must be in [1, 5] (gRPC's limit)");
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetServiceConfigJSON(absl::StrReplaceAll(
      kServiceConfig, {{"MAX_ATTEMPTS", std::to_string(std::max(2, options.max_attempts))}}));
  if (options.max_attempts == 1) args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  auto channel = grpc::CreateCustomChannel(options.target, creds, args);
  return std::unique_ptr<Client>(new Client(std::move(options), std::move(channel)));
}

Client::Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(psa::v1::Generation::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> Client::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.api_key);
  return ctx;
}

absl::StatusOr<Completion> Client::Generate(const psa::v1::GenerateRequest& request,
                                            const ChunkCallback& on_chunk) {
  auto ctx = Context();
  auto reader = stub_->Generate(ctx.get(), request);
  Completion done;
  psa::v1::GenerateResponse chunk;
  bool cancelled = false;
  while (reader->Read(&chunk)) {
    done.text += chunk.text();
    done.token_ids.insert(done.token_ids.end(), chunk.token_ids().begin(),
                          chunk.token_ids().end());
    if (!chunk.finish_reason().empty()) {
      done.finish_reason = chunk.finish_reason();
      done.usage = chunk.usage();
    }
    if (on_chunk && !cancelled && !on_chunk(chunk)) {
      cancelled = true;
      ctx->TryCancel();
    }
  }
  const grpc::Status s = reader->Finish();
  if (cancelled) {
    done.finish_reason = "cancelled";
    return done;
  }
  if (!s.ok()) return FromGrpc(s, options_.target);
  return done;
}

absl::StatusOr<std::vector<uint32_t>> Client::Tokenize(const std::string& text) {
  psa::v1::TokenizeRequest request;
  request.set_text(text);
  psa::v1::TokenizeResponse response;
  auto ctx = Context();
  const grpc::Status s = stub_->Tokenize(ctx.get(), request, &response);
  if (!s.ok()) return FromGrpc(s, options_.target);
  return std::vector<uint32_t>(response.token_ids().begin(), response.token_ids().end());
}

absl::StatusOr<psa::v1::ModelInfo> Client::GetModelInfo() {
  psa::v1::ModelInfo info;
  auto ctx = Context();
  const grpc::Status s = stub_->GetModelInfo(ctx.get(), psa::v1::GetModelInfoRequest(), &info);
  if (!s.ok()) return FromGrpc(s, options_.target);
  return info;
}

psa::v1::GenerateRequest TextPrompt(const std::string& text, int max_tokens) {
  psa::v1::GenerateRequest r;
  r.set_text(text);
  r.set_max_tokens(max_tokens);
  return r;
}

psa::v1::GenerateRequest ChatPrompt(
    const std::vector<std::pair<std::string, std::string>>& messages, int max_tokens) {
  psa::v1::GenerateRequest r;
  for (const auto& [role, content] : messages) {
    auto* m = r.mutable_chat()->add_messages();
    m->set_role(role);
    m->set_content(content);
  }
  r.set_max_tokens(max_tokens);
  return r;
}

}  // namespace psa::client
