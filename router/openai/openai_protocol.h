// The OpenAI wire format, translated to and from psa.v1: request bodies of
// /v1/completions and /v1/chat/completions to a GenerateRequest, streamed
// GenerateResponses to response objects and server-sent-event chunks, and
// gRPC failures to OpenAI's error object with its HTTP status.
//
// Pure functions over JSON values and protos: no I/O, no state, safe from
// any thread. The HTTP server (http_front_door.h) does the transport.
//
// What is accepted (the fields OpenAI defines, with its defaults):
//   model (required, must name the served model), prompt (a string, or a
//   list of one string or of token ids) or messages (system/developer/user/
//   assistant, content a string or a list of text parts), max_tokens /
//   max_completion_tokens, temperature, top_p, stop (string or up to 4),
//   seed, stream, stream_options.include_usage, presence_penalty,
//   frequency_penalty, n = 1, user (ignored).
// Extensions, as vLLM names them: top_k, repetition_penalty, ignore_eos,
// cache_salt;
// and PSA's: attention ("default", "dense", "topk", "psa"), psa_epsilon,
// top_k_blocks. Fields the engine cannot honour (logprobs, tools, best_of,
// echo, suffix, logit_bias, response_format...) are refused by name rather
// than silently ignored; unknown fields are ignored, as OpenAI does.
#ifndef PSA_ROUTER_OPENAI_OPENAI_PROTOCOL_H_
#define PSA_ROUTER_OPENAI_OPENAI_PROTOCOL_H_

#include <cstdint>
#include <optional>
#include <string>

#include "grpcpp/support/status.h"
#include "nlohmann/json.hpp"
#include "proto/psa/v1/generation.pb.h"

namespace psa::openai {

enum class Endpoint { kCompletions, kChatCompletions };

// An OpenAI error: {"error": {"message", "type", "param", "code"}} with its
// HTTP status.
struct ApiError {
  int http_status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::string param;  // the offending field; empty: null
  std::string code;   // e.g. "model_not_found"; empty: null
  int retry_after_s = 0;  // > 0: a Retry-After header

  nlohmann::json ToJson() const;
};

// A parsed request: what goes to the router, and how to answer.
struct ParsedRequest {
  psa::v1::GenerateRequest request;
  std::string model;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
};

// Parses a request body for `endpoint`. `served_model` is the only model
// name accepted. Errors name the field and what to send instead.
std::optional<ParsedRequest> ParseRequest(Endpoint endpoint, const std::string& body,
                                          const std::string& served_model, ApiError* error);

// The HTTP status and OpenAI error for a gRPC failure; a RESOURCE_EXHAUSTED
// with a retry-after-ms trailer becomes 429 with Retry-After.
ApiError FromGrpcStatus(const grpc::Status& status, int64_t retry_after_ms = 0);

// OpenAI's finish_reason for the engine's ("eos" and "stop" are "stop").
std::string FinishReason(const std::string& engine_reason);

// The fields every response and chunk of one request shares.
struct ResponseHeader {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;
  std::string model;
};

// A new id: the prefix OpenAI uses for `endpoint` and 24 random hex digits.
std::string NewResponseId(Endpoint endpoint);

nlohmann::json UsageJson(const psa::v1::Usage& usage);

// The whole (non-streamed) response.
nlohmann::json CompleteResponse(const ResponseHeader& header, const std::string& text,
                                const std::string& finish_reason, const psa::v1::Usage& usage);

// One streamed chunk: `text` (may be empty) and, on the last, the finish
// reason. Chat's first chunk carries the assistant role (`first`).
// `include_usage`: chunks carry "usage": null, as OpenAI's do.
nlohmann::json StreamChunk(const ResponseHeader& header, const std::string& text,
                           const std::string& finish_reason, bool first, bool include_usage);

// The usage chunk after the last (stream_options.include_usage): no choices.
nlohmann::json UsageChunk(const ResponseHeader& header, const psa::v1::Usage& usage);

// GET /v1/models.
nlohmann::json ModelList(const std::string& model, const psa::v1::ModelInfo& info,
                         int64_t created);

}  // namespace psa::openai

#endif  // PSA_ROUTER_OPENAI_OPENAI_PROTOCOL_H_
