// The OpenAI request and response translation (router/openai), without a
// server: every accepted field lands in the GenerateRequest, every refusal
// names its field, and responses and chunks have OpenAI's shape. The HTTP
// path is tested end to end with the `openai` package
// (scripts/test_openai_api.sh).
#include "router/openai/openai_protocol.h"

#include "gtest/gtest.h"

namespace psa::openai {
namespace {

using nlohmann::json;

std::optional<ParsedRequest> Parse(Endpoint e, const json& body, ApiError* error) {
  return ParseRequest(e, body.dump(), "m", error);
}

TEST(OpenAiProtocolTest, CompletionFieldsLandInTheRequest) {
  ApiError error;
  auto p = Parse(Endpoint::kCompletions,
                 {{"model", "m"}, {"prompt", "hi"}, {"max_tokens", 7}, {"temperature", 0.5},
                  {"top_p", 0.9}, {"stop", {"a", "b"}}, {"seed", -1}, {"stream", true},
                  {"stream_options", {{"include_usage", true}}}, {"presence_penalty", 1},
                  {"frequency_penalty", -1}, {"top_k", -1}, {"attention", "psa"},
                  {"psa_epsilon", 0.7}, {"user", "u"}, {"some_future_field", 1}},
                 &error);
  ASSERT_TRUE(p) << error.message;
  const psa::v1::GenerateRequest& r = p->request;
  EXPECT_EQ(r.text(), "hi");
  EXPECT_EQ(r.max_tokens(), 7u);
  EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().top_k(), 0u);
  EXPECT_EQ(r.sampling().seed(), ~uint64_t{0});
  EXPECT_FLOAT_EQ(r.sampling().presence_penalty(), 1.0f);
  EXPECT_FLOAT_EQ(r.sampling().frequency_penalty(), -1.0f);
  ASSERT_EQ(r.stop_size(), 2);
  EXPECT_EQ(r.stop(1), "b");
  EXPECT_EQ(r.attention().kind(), psa::v1::AttentionPolicy::KIND_PSA);
  EXPECT_FLOAT_EQ(r.attention().epsilon(), 0.7f);
  EXPECT_TRUE(p->stream);
  EXPECT_TRUE(p->include_usage);
}

TEST(OpenAiProtocolTest, OpenAiDefaults) {
  ApiError error;
  auto c = Parse(Endpoint::kCompletions, {{"model", "m"}, {"prompt", {1, 2, 3}}}, &error);
  ASSERT_TRUE(c) << error.message;
  EXPECT_EQ(c->request.token_ids().ids_size(), 3);
  EXPECT_EQ(c->request.max_tokens(), 16u);                 // OpenAI's completions default
  EXPECT_FLOAT_EQ(c->request.sampling().temperature(), 1);  // and its temperature
  auto d = Parse(Endpoint::kCompletions, {{"model", "m"}, {"prompt", "x"}}, &error);
  EXPECT_NE(c->request.sampling().seed(), d->request.sampling().seed());  // fresh seeds
  auto chat = Parse(Endpoint::kChatCompletions,
                    {{"model", "m"},
                     {"messages", {{{"role", "developer"}, {"content", "be brief"}},
                                   {{"role", "user"},
                                    {"content", {{{"type", "text"}, {"text", "a"}},
                                                 {{"type", "text"}, {"text", "b"}}}}}}},
                     {"max_completion_tokens", 9}},
                    &error);
  ASSERT_TRUE(chat) << error.message;
  ASSERT_EQ(chat->request.chat().messages_size(), 2);
  EXPECT_EQ(chat->request.chat().messages(0).role(), "system");
  EXPECT_EQ(chat->request.chat().messages(1).content(), "ab");
  EXPECT_EQ(chat->request.max_tokens(), 9u);
}

TEST(OpenAiProtocolTest, RefusalsNameTheField) {
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"prompt", "x"}}, "model"},
      {{{"model", 3}, {"prompt", "x"}}, "model"},
      {{{"model", "m"}}, "prompt"},
      {{{"model", "m"}, {"prompt", ""}}, "prompt"},
      {{{"model", "m"}, {"prompt", {"a", "b"}}}, "prompt"},
      {{{"model", "m"}, {"prompt", {1, -2}}}, "prompt"},
      {{{"model", "m"}, {"prompt", "x"}, {"max_tokens", 1.5}}, "max_tokens"},
      {{{"model", "m"}, {"prompt", "x"}, {"max_tokens", 0}}, "max_tokens"},
      {{{"model", "m"}, {"prompt", "x"}, {"temperature", -0.1}}, "temperature"},
      {{{"model", "m"}, {"prompt", "x"}, {"top_p", 1.5}}, "top_p"},
      {{{"model", "m"}, {"prompt", "x"}, {"n", 3}}, "n"},
      {{{"model", "m"}, {"prompt", "x"}, {"stop", {""}}}, "stop"},
      {{{"model", "m"}, {"prompt", "x"}, {"echo", true}}, "echo"},
      {{{"model", "m"}, {"prompt", "x"}, {"stream", "yes"}}, "stream"},
      {{{"model", "m"}, {"prompt", "x"}, {"psa_epsilon", 0}}, "psa_epsilon"},
      {{{"model", "m"}, {"prompt", "x"}, {"seed", 1e30}}, "seed"},
  };
  for (const auto& [body, param] : cases) {
    ApiError error;
    EXPECT_FALSE(Parse(Endpoint::kCompletions, body, &error)) << body.dump();
    EXPECT_EQ(error.param, param) << body.dump() << ": " << error.message;
    EXPECT_EQ(error.http_status, 400) << body.dump();
  }
  ApiError error;
  EXPECT_FALSE(Parse(Endpoint::kChatCompletions,
                     {{"model", "m"}, {"messages", {{{"role", "tool"}, {"content", "x"}}}}},
                     &error));
  EXPECT_EQ(error.param, "messages[0].role");
  EXPECT_FALSE(ParseRequest(Endpoint::kCompletions, "{\"model\": ", "m", &error));
  EXPECT_EQ(error.http_status, 400);
  EXPECT_FALSE(Parse(Endpoint::kCompletions, {{"model", "other"}, {"prompt", "x"}}, &error));
  EXPECT_EQ(error.http_status, 404);
  EXPECT_EQ(error.code, "model_not_found");
  // Off values of unsupported fields are fine.
  EXPECT_TRUE(Parse(Endpoint::kCompletions,
                    {{"model", "m"}, {"prompt", "x"}, {"logprobs", nullptr}, {"echo", false},
                     {"logit_bias", json::object()}, {"best_of", 1}},
                    &error))
      << error.message;
}

TEST(OpenAiProtocolTest, GrpcFailuresMapToHttp) {
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                        "prompt plus max_tokens exceeds the context limit"))
                .code,
            "context_length_exceeded");
  ApiError busy = FromGrpcStatus(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "full"), 1500);
  EXPECT_EQ(busy.http_status, 429);
  EXPECT_EQ(busy.retry_after_s, 2);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "")).http_status, 503);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "")).http_status, 401);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "")).http_status,
            504);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::INTERNAL, "")).http_status, 500);
  json j = FromGrpcStatus(grpc::Status(grpc::StatusCode::INTERNAL, "boom")).ToJson();
  EXPECT_EQ(j["error"]["message"], "boom");
  EXPECT_TRUE(j["error"]["param"].is_null());
}

TEST(OpenAiProtocolTest, ResponsesHaveOpenAisShape) {
  psa::v1::Usage usage;
  usage.set_prompt_tokens(3);
  usage.set_completion_tokens(4);
  ResponseHeader chat{Endpoint::kChatCompletions, NewResponseId(Endpoint::kChatCompletions), 5,
                      "m"};
  json done = CompleteResponse(chat, "hi", "eos", usage);
  EXPECT_EQ(done["object"], "chat.completion");
  EXPECT_EQ(done["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(done["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(done["usage"]["total_tokens"], 7);
  EXPECT_EQ(chat.id.rfind("chatcmpl-", 0), 0u);
  json first = StreamChunk(chat, "a", "", /*first=*/true, /*include_usage=*/true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  json last = StreamChunk(chat, "", "length", false, false);
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_FALSE(last.contains("usage"));
  EXPECT_TRUE(UsageChunk(chat, usage)["choices"].empty());
  ResponseHeader text{Endpoint::kCompletions, "cmpl-1", 5, "m"};
  EXPECT_EQ(StreamChunk(text, "b", "", true, false)["choices"][0]["text"], "b");
}

}  // namespace
}  // namespace psa::openai
