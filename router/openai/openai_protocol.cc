#include "router/openai/openai_protocol.h"

#include <cmath>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace psa::openai {
namespace {

using nlohmann::json;

// Sets *error to a 400 naming `param`; returns false for `return Fail(...)`.
bool Fail(ApiError* error, const std::string& param, const std::string& message) {
  error->http_status = 400;
  error->type = "invalid_request_error";
  error->param = param;
  error->message = message;
  return false;
}

std::string TypeName(const json& v) {
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

// Optional fields: absent or null leaves `out` as it is.
bool GetNumber(const json& body, const char* name, double lo, double hi, double* out,
               ApiError* error) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return true;
  if (!it->is_number()) {
    return Fail(error, name, absl::StrCat(name, " must be a number, got ", TypeName(*it)));
  }
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi)) {
    return Fail(error, name, absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", v));
  }
  *out = v;
  return true;
}

bool GetInteger(const json& body, const char* name, int64_t lo, int64_t hi, int64_t* out,
                ApiError* error) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return true;
  if (!it->is_number_integer() && !it->is_number_unsigned()) {
    return Fail(error, name, absl::StrCat(name, " must be an integer, got ", TypeName(*it)));
  }
  if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(hi)) {
    return Fail(error, name, absl::StrCat(name, " must be at most ", hi));
  }
  const int64_t v = it->get<int64_t>();
  if (v < lo || v > hi) {
    return Fail(error, name, absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", v));
  }
  *out = v;
  return true;
}

bool GetBool(const json& body, const char* name, bool* out, ApiError* error) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return true;
  if (!it->is_boolean()) {
    return Fail(error, name, absl::StrCat(name, " must be a boolean, got ", TypeName(*it)));
  }
  *out = it->get<bool>();
  return true;
}

// Fields OpenAI defines that this engine cannot honour: refused when set to
// anything but their "off" value, so no client believes it got them.
bool RefuseUnsupported(const json& body, ApiError* error) {
  static const char* const kUnsupported[] = {
      "logprobs", "top_logprobs", "echo",      "best_of",        "suffix",     "logit_bias",
      "tools",    "tool_choice",  "functions", "function_call",  "response_format",
      "audio",    "modalities",   "prediction", "parallel_tool_calls"};
  for (const char* name : kUnsupported) {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) continue;
    if (it->is_boolean() && !it->get<bool>()) continue;        // logprobs: false, echo: false
    if ((it->is_object() || it->is_array()) && it->empty()) continue;  // logit_bias: {}
    if (std::string(name) == "best_of" && it->is_number_integer() && it->get<int64_t>() == 1) {
      continue;
    }
    return Fail(error, name, absl::StrCat(name, " is not supported by this server"));
  }
  return true;
}

bool ParsePrompt(const json& body, psa::v1::GenerateRequest* out, ApiError* error) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) {
    return Fail(error, "prompt", "prompt is required: a string, or a list of token ids");
  }
  const json& p = *it;
  auto is_token = [](const json& t) { return t.is_number_integer() || t.is_number_unsigned(); };
  auto tokens = [&](const json& list) {
    for (const json& t : list) {
      if (!is_token(t) || t.get<int64_t>() < 0 || t.get<int64_t>() > UINT32_MAX) {
        return Fail(error, "prompt", "prompt token ids must be non-negative integers");
      }
      out->mutable_token_ids()->add_ids(t.get<uint32_t>());
    }
    if (list.empty()) return Fail(error, "prompt", "prompt must not be empty");
    return true;
  };
  if (p.is_string()) {
    if (p.get_ref<const std::string&>().empty()) {
      return Fail(error, "prompt", "prompt must not be empty");
    }
    out->set_text(p.get<std::string>());
    return true;
  }
  if (p.is_array() && !p.empty() && is_token(p[0])) return tokens(p);
  if (p.is_array() && p.size() == 1) {  // a batch of one
    if (p[0].is_string()) {
      json one = body;
      one["prompt"] = p[0];
      return ParsePrompt(one, out, error);
    }
    if (p[0].is_array()) return tokens(p[0]);
  }
  if (p.is_array() && p.size() > 1 && (p[0].is_string() || p[0].is_array())) {
    return Fail(error, "prompt",
                "a batch of prompts is not supported: send one prompt per request");
  }
  return Fail(error, "prompt",
              absl::StrCat("prompt must be a string or a list of token ids, got ", TypeName(p)));
}

bool ParseMessages(const json& body, psa::v1::GenerateRequest* out, ApiError* error) {
  auto it = body.find("messages");
  if (it == body.end() || it->is_null()) {
    return Fail(error, "messages", "messages is required: a list of {role, content}");
  }
  if (!it->is_array() || it->empty()) {
    return Fail(error, "messages", "messages must be a non-empty list of {role, content}");
  }
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return Fail(error, at, absl::StrCat(at, " must be an object"));
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return Fail(error, at + ".role", absl::StrCat(at, ".role must be a string"));
    }
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";  // OpenAI's newer name for the system turn
    if (r != "system" && r != "user" && r != "assistant") {
      return Fail(error, at + ".role",
                  absl::StrCat(at, ".role \"", role->get<std::string>(),
                               "\" is not supported: use system, developer, user or assistant"));
    }
    std::string content;
    auto c = m.find("content");
    if (c == m.end() || c->is_null()) {
      return Fail(error, at + ".content", absl::StrCat(at, ".content is required"));
    } else if (c->is_string()) {
      content = c->get<std::string>();
    } else if (c->is_array()) {  // content parts: text only
      for (const json& part : *c) {
        auto type = part.is_object() ? part.find("type") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" ||
            !part.contains("text") || !part["text"].is_string()) {
          return Fail(error, at + ".content",
                      absl::StrCat(at, ".content parts must be {\"type\": \"text\", \"text\": ...}"
                                       " (this model reads text only)"));
        }
        content += part["text"].get<std::string>();
      }
    } else {
      return Fail(error, at + ".content",
                  absl::StrCat(at, ".content must be a string or a list of text parts, got ",
                               TypeName(*c)));
    }
    auto* message = out->mutable_chat()->add_messages();
    message->set_role(r);
    message->set_content(std::move(content));
  }
  return true;
}

bool ParseStop(const json& body, psa::v1::GenerateRequest* out, ApiError* error) {
  auto it = body.find("stop");
  if (it == body.end() || it->is_null()) return true;
  std::vector<std::string> stops;
  if (it->is_string()) {
    stops.push_back(it->get<std::string>());
  } else if (it->is_array()) {
    for (const json& s : *it) {
      if (!s.is_string()) return Fail(error, "stop", "stop must be a string or a list of strings");
      stops.push_back(s.get<std::string>());
    }
  } else {
    return Fail(error, "stop",
                absl::StrCat("stop must be a string or a list of strings, got ", TypeName(*it)));
  }
  if (stops.size() > 4) return Fail(error, "stop", "stop takes at most 4 strings");
  for (const std::string& s : stops) {
    if (s.empty()) return Fail(error, "stop", "stop strings must not be empty");
    out->add_stop(s);
  }
  return true;
}

bool ParseAttention(const json& body, psa::v1::GenerateRequest* out, ApiError* error) {
  psa::v1::AttentionPolicy* policy = out->mutable_attention();
  if (auto it = body.find("attention"); it != body.end() && !it->is_null()) {
    const std::string kind = it->is_string() ? it->get<std::string>() : "";
    if (kind == "default") {
      policy->set_kind(psa::v1::AttentionPolicy::KIND_DEFAULT);
    } else if (kind == "dense") {
      policy->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
    } else if (kind == "topk") {
      policy->set_kind(psa::v1::AttentionPolicy::KIND_TOPK);
    } else if (kind == "psa") {
      policy->set_kind(psa::v1::AttentionPolicy::KIND_PSA);
    } else {
      return Fail(error, "attention", "attention must be \"default\", \"dense\", \"topk\" or \"psa\"");
    }
  }
  double epsilon = 0;
  if (!GetNumber(body, "psa_epsilon", 0, 1, &epsilon, error)) return false;
  if (body.contains("psa_epsilon") && !body["psa_epsilon"].is_null() && epsilon <= 0) {
    return Fail(error, "psa_epsilon", "psa_epsilon must be in (0, 1]");
  }
  policy->set_epsilon(static_cast<float>(epsilon));
  int64_t blocks = 0;
  if (!GetInteger(body, "top_k_blocks", 0, 1 << 20, &blocks, error)) return false;
  policy->set_top_k_blocks(static_cast<uint32_t>(blocks));
  return true;
}

}  // namespace

json ApiError::ToJson() const {
  return {{"error",
           {{"message", message},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

std::optional<ParsedRequest> ParseRequest(Endpoint endpoint, const std::string& text,
                                          const std::string& served_model, ApiError* error) {
  json body = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    Fail(error, "", "the body is not valid JSON");
    return std::nullopt;
  }
  if (!body.is_object()) {
    Fail(error, "", "the body must be a JSON object");
    return std::nullopt;
  }
  ParsedRequest parsed;
  psa::v1::GenerateRequest& req = parsed.request;

  auto model = body.find("model");
  if (model == body.end() || !model->is_string()) {
    Fail(error, "model", "model is required: a string (GET /v1/models lists them)");
    return std::nullopt;
  }
  parsed.model = model->get<std::string>();
  if (parsed.model != served_model) {
    error->http_status = 404;
    error->type = "invalid_request_error";
    error->param = "model";
    error->code = "model_not_found";
    error->message = absl::StrCat("The model `", parsed.model,
                                  "` does not exist: this server serves `", served_model, "`");
    return std::nullopt;
  }
  if (!RefuseUnsupported(body, error)) return std::nullopt;
  if (endpoint == Endpoint::kCompletions ? !ParsePrompt(body, &req, error)
                                         : !ParseMessages(body, &req, error)) {
    return std::nullopt;
  }

  int64_t n = 1;
  if (!GetInteger(body, "n", 1, 128, &n, error)) return std::nullopt;
  if (n != 1) {
    Fail(error, "n", "n must be 1: send one request per completion");
    return std::nullopt;
  }
  // OpenAI's defaults: 16 tokens for completions; for chat, up to the
  // context (0: the worker's default).
  int64_t max_tokens = endpoint == Endpoint::kCompletions ? 16 : 0;
  if (!GetInteger(body, "max_tokens", 0, 1 << 24, &max_tokens, error) ||
      !GetInteger(body, "max_completion_tokens", 0, 1 << 24, &max_tokens, error)) {
    return std::nullopt;
  }
  if (max_tokens == 0 && endpoint == Endpoint::kCompletions && body.contains("max_tokens") &&
      !body["max_tokens"].is_null()) {
    Fail(error, "max_tokens", "max_tokens must be at least 1");
    return std::nullopt;
  }
  req.set_max_tokens(static_cast<uint32_t>(max_tokens));

  psa::v1::SamplingParams* s = req.mutable_sampling();
  double temperature = 1, top_p = 1, presence = 0, frequency = 0, repetition = 1;
  int64_t top_k = 0;
  if (!GetNumber(body, "temperature", 0, 2, &temperature, error) ||
      !GetNumber(body, "top_p", 0, 1, &top_p, error) ||
      !GetNumber(body, "presence_penalty", -2, 2, &presence, error) ||
      !GetNumber(body, "frequency_penalty", -2, 2, &frequency, error) ||
      !GetNumber(body, "repetition_penalty", 0, 100, &repetition, error) ||
      !GetInteger(body, "top_k", -1, 1 << 20, &top_k, error)) {
    return std::nullopt;
  }
  if (top_p <= 0) {
    Fail(error, "top_p", "top_p must be in (0, 1]");
    return std::nullopt;
  }
  if (repetition <= 0) {
    Fail(error, "repetition_penalty", "repetition_penalty must be > 0 (1: off)");
    return std::nullopt;
  }
  s->set_temperature(static_cast<float>(temperature));
  s->set_top_p(static_cast<float>(top_p));
  s->set_presence_penalty(static_cast<float>(presence));
  s->set_frequency_penalty(static_cast<float>(frequency));
  s->set_repetition_penalty(static_cast<float>(repetition));
  s->set_top_k(top_k < 0 ? 0 : static_cast<uint32_t>(top_k));  // vLLM's -1: no limit
  // No seed: a fresh one, so repeated requests sample differently (as
  // OpenAI's do); the router resumes a failed stream with the same seed.
  int64_t seed = 0;
  if (auto it = body.find("seed"); it != body.end() && !it->is_null()) {
    if (!GetInteger(body, "seed", INT64_MIN, INT64_MAX, &seed, error)) return std::nullopt;
    s->set_seed(static_cast<uint64_t>(seed));
  } else {
    s->set_seed(std::random_device{}() | (uint64_t{std::random_device{}()} << 32));
  }
  bool ignore_eos = false;
  if (!GetBool(body, "ignore_eos", &ignore_eos, error)) return std::nullopt;
  req.set_ignore_eos(ignore_eos);
  if (!ParseStop(body, &req, error) || !ParseAttention(body, &req, error)) return std::nullopt;

  if (!GetBool(body, "stream", &parsed.stream, error)) return std::nullopt;
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) {
      Fail(error, "stream_options", "stream_options must be an object");
      return std::nullopt;
    }
    if (!parsed.stream) {
      Fail(error, "stream_options", "stream_options is only allowed with stream: true");
      return std::nullopt;
    }
    if (!GetBool(*it, "include_usage", &parsed.include_usage, error)) {
      error->param = "stream_options.include_usage";
      return std::nullopt;
    }
  }
  if (auto it = body.find("cache_salt"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) {
      Fail(error, "cache_salt", "cache_salt must be a string");
      return std::nullopt;
    }
    req.set_cache_salt(it->get<std::string>());
  }
  if (auto it = body.find("user"); it != body.end() && !it->is_null() && !it->is_string()) {
    Fail(error, "user", "user must be a string");
    return std::nullopt;
  }
  return parsed;
}

ApiError FromGrpcStatus(const grpc::Status& status, int64_t retry_after_ms) {
  ApiError e;
  e.message = status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      e.http_status = 400;
      if (absl::StrContains(e.message, "context limit")) e.code = "context_length_exceeded";
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.http_status = 404;
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.http_status = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.retry_after_s = retry_after_ms > 0 ? static_cast<int>((retry_after_ms + 999) / 1000) : 0;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.http_status = 503;
      e.type = "server_error";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.http_status = 504;
      e.type = "timeout";
      break;
    case grpc::StatusCode::CANCELLED:
      e.http_status = 499;  // the client went away (nginx's convention)
      e.type = "cancelled";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

std::string FinishReason(const std::string& engine_reason) {
  if (engine_reason == "eos" || engine_reason == "stop") return "stop";
  return engine_reason;  // "length"
}

std::string NewResponseId(Endpoint endpoint) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char hex[25];
  std::snprintf(hex, sizeof(hex), "%016llx%08llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng() & 0xffffffffu));
  return absl::StrCat(endpoint == Endpoint::kCompletions ? "cmpl-" : "chatcmpl-", hex);
}

json UsageJson(const psa::v1::Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens()},
          {"completion_tokens", usage.completion_tokens()},
          {"total_tokens", usage.prompt_tokens() + usage.completion_tokens()}};
}

namespace {

json Header(const ResponseHeader& h, bool chunk) {
  const bool chat = h.endpoint == Endpoint::kChatCompletions;
  return {{"id", h.id},
          {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                          : "text_completion"},
          {"created", h.created},
          {"model", h.model}};
}

json Reason(const std::string& r) { return r.empty() ? json(nullptr) : json(FinishReason(r)); }

}  // namespace

json CompleteResponse(const ResponseHeader& header, const std::string& text,
                      const std::string& finish_reason, const psa::v1::Usage& usage) {
  json out = Header(header, /*chunk=*/false);
  json choice = {{"index", 0}, {"finish_reason", Reason(finish_reason)}};
  if (header.endpoint == Endpoint::kChatCompletions) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
    choice["logprobs"] = nullptr;
  } else {
    choice["text"] = text;
    choice["logprobs"] = nullptr;
  }
  out["choices"] = json::array({choice});
  out["usage"] = UsageJson(usage);
  out["psa_attention"] = {{"policy", usage.attention()},
                          {"kv_blocks_touched", usage.kv_blocks_touched()},
                          {"kv_blocks_total", usage.kv_blocks_total()}};
  return out;
}

json StreamChunk(const ResponseHeader& header, const std::string& text,
                 const std::string& finish_reason, bool first, bool include_usage) {
  json out = Header(header, /*chunk=*/true);
  json choice = {{"index", 0}, {"finish_reason", Reason(finish_reason)}, {"logprobs", nullptr}};
  if (header.endpoint == Endpoint::kChatCompletions) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = text;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  out["choices"] = json::array({choice});
  if (include_usage) out["usage"] = nullptr;
  return out;
}

json UsageChunk(const ResponseHeader& header, const psa::v1::Usage& usage) {
  json out = Header(header, /*chunk=*/true);
  out["choices"] = json::array();
  out["usage"] = UsageJson(usage);
  return out;
}

json ModelList(const std::string& model, const psa::v1::ModelInfo& info, int64_t created) {
  json entry = {{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "psa-serve"}};
  if (info.max_context() > 0) entry["max_model_len"] = info.max_context();
  return {{"object", "list"}, {"data", json::array({entry})}};
}

}  // namespace psa::openai
