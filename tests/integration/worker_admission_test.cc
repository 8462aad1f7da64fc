// Admission on a real worker process: values named as sent, prompts that
// cannot fit refused before tokenizing, the request size limit, and resumes
// taken only with the router's signature.
#include "tests/integration/worker_testing.h"

namespace psa {
namespace worker_testing {
namespace {

TEST_F(TinyWorkerTest, UnsignedFieldsAreNamedAsSent) {
  Worker worker(*path_);
  auto huge = IdsRequest({1, 2, 3}, 0, psa::v1::AttentionPolicy::KIND_DENSE);
  huge.set_max_tokens(4294967295u);
  Streamed got = worker.Generate(huge);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(got.status.error_message(), HasSubstr("max_tokens is 4294967295"));

  auto bad_id = IdsRequest({1, 2}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  bad_id.mutable_token_ids()->add_ids(4294967295u);
  got = worker.Generate(bad_id);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(got.status.error_message(), HasSubstr("token_ids.ids[2] is 4294967295"));

  // top_k beyond the vocabulary keeps every token, as 0 does.
  auto all = IdsRequest({1, 2, 3}, 4, psa::v1::AttentionPolicy::KIND_DENSE);
  all.mutable_sampling()->set_top_k(4294967295u);
  got = worker.Generate(all);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens, Reference({1, 2, 3}, 4, Dense()));
}

TEST_F(TinyWorkerTest, APromptThatCannotFitIsRefusedBeforeTokenizing) {
  Worker worker(*path_, {"--max_request_bytes=1MiB"});
  // The tiny model's context is 1024 tokens; its longest token 12 bytes.
  psa::v1::GenerateRequest text;
  text.set_text(std::string(900 << 10, 'a'));
  text.set_max_tokens(4);
  const absl::Time start = absl::Now();
  Streamed got = worker.Generate(text);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(got.status.error_message(),
              HasSubstr("text is 921600 bytes, so at least 76800 tokens"));
  EXPECT_THAT(got.status.error_message(), HasSubstr("context limit of 1024"));
  EXPECT_LT(took, absl::Seconds(5));  // tokenizing it is what this avoids
  EXPECT_EQ(worker.Metric("psa_worker_requests_total{outcome=\"INVALID_ARGUMENT\"}"), 1);

  // A chat is checked after its template (which may trim), still before
  // tokenizing.
  psa::v1::GenerateRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content(std::string(600 << 10, 'b'));
  got = worker.Generate(chat);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(got.status.error_message(), HasSubstr("chat (formatted with the model's chat"));

  // Over --max_request_bytes: gRPC refuses the message itself.
  text.set_text(std::string(1100 << 10, 'a'));
  got = worker.Generate(text);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(got.status.error_message(), HasSubstr("1048576"));

  // What fits is served, text and chat.
  text.set_text("the cat sat on the mat");
  EXPECT_TRUE(worker.Generate(text).status.ok());
  m->set_content("hi there");
  chat.set_max_tokens(3);
  got = worker.Generate(chat);
  EXPECT_TRUE(got.status.ok()) << got.status.error_message();
}

TEST_F(TinyWorkerTest, AResumeNeedsTheRoutersSignature) {
  Worker worker(*path_);
  const auto prompt = Prompt(12, vocab(), 9);
  auto request = IdsRequest(prompt, 6, psa::v1::AttentionPolicy::KIND_DENSE);
  const std::vector<TokenId> whole = Reference(prompt, 6, Dense());
  request.mutable_resume()->add_token_ids(whole[0]);
  request.mutable_resume()->add_token_ids(whole[1]);

  Streamed forged = worker.Generate(request);  // no signature
  EXPECT_EQ(forged.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(forged.status.error_message(), HasSubstr("clients must not set it"));
  const ResumeAuth other("not-the-cluster-secret");
  forged = psa::testing::StreamGenerate(worker.address(), request, absl::Seconds(60), nullptr,
                                        {{ResumeAuth::kMetadataKey, other.Sign(request)}});
  EXPECT_EQ(forged.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(forged.status.error_message(), HasSubstr("does not match"));
  EXPECT_EQ(worker.Metric("psa_worker_generation_tokens_total"), 0);

  Streamed signed_resume = worker.GenerateResumed(request);
  ASSERT_TRUE(signed_resume.status.ok()) << signed_resume.status.error_message();
  EXPECT_EQ(signed_resume.tokens, std::vector<TokenId>(whole.begin() + 2, whole.end()));
  EXPECT_EQ(signed_resume.usage.completion_tokens(), 6u);

  Worker no_secret(*path_, {"--resume_secret_file="});
  forged = no_secret.GenerateResumed(request);
  EXPECT_EQ(forged.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(forged.status.error_message(), HasSubstr("--resume_secret_file"));
}

}  // namespace
}  // namespace worker_testing
}  // namespace psa
