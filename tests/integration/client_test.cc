// The C++ SDK and psactl against a real worker process (tiny model).
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "client/psa_client.h"
#include "compute_worker/model/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/reference_generation.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using psa::testing::ServerProcess;
using ::testing::HasSubstr;

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    psa::testing::TinyModelSpec spec;
    spec.n_ctx = 512;
    path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "client.gguf"));
    auto worker = ServerProcess::Start(
        PSA_WORKER_BIN, {"--model=" + *path_, "--listen=127.0.0.1:0",
                         "--metrics_listen=127.0.0.1:0", "--threads=2"});
    ASSERT_TRUE(worker.ok()) << worker.status();
    worker_ = worker->release();
  }
  static void TearDownTestSuite() {
    delete worker_;
    delete path_;
  }
  std::unique_ptr<client::Client> Connect(const std::string& target) {
    client::ClientOptions options;
    options.target = target;
    options.timeout = absl::Seconds(30);
    auto c = client::Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }
  // Runs psactl with `args`; returns its exit code, stdout in `out`.
  int Psactl(const std::string& args, std::string* out) {
    const std::string cmd = absl::StrCat(PSACTL_BIN, " --target=", worker_->address(), " ",
                                         args, " 2>&1");
    FILE* p = popen(cmd.c_str(), "r");
    char buf[4096];
    size_t n;
    out->clear();
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
    return WEXITSTATUS(pclose(p));
  }

  static std::string* path_;
  static ServerProcess* worker_;
};
std::string* ClientTest::path_ = nullptr;
ServerProcess* ClientTest::worker_ = nullptr;

TEST_F(ClientTest, GenerateStreamsWhatTheRuntimeComputes) {
  auto c = Connect(worker_->address());
  psa::v1::GenerateRequest request;
  for (uint32_t t : {5u, 17u, 99u, 3u, 250u, 42u}) request.mutable_token_ids()->add_ids(t);
  request.set_max_tokens(12);
  request.set_ignore_eos(true);
  request.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
  int chunks = 0;
  auto done = c->Generate(request, [&](const psa::v1::GenerateResponse&) {
    ++chunks;
    return true;
  });
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->token_ids.size(), 12u);
  EXPECT_GE(chunks, 1);
  EXPECT_EQ(done->finish_reason, "length");
  EXPECT_EQ(done->usage.completion_tokens(), 12u);

  auto model = LlamaModel::Load(*path_);
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(std::vector<TokenId>(done->token_ids.begin(), done->token_ids.end()),
            psa::testing::ReferenceTokens(**model, {5, 17, 99, 3, 250, 42}, 12));
}

TEST_F(ClientTest, CancelErrorsAndUnreachableServers) {
  auto c = Connect(worker_->address());
  auto long_request = client::TextPrompt("hello", 400);
  long_request.set_ignore_eos(true);
  auto cancelled = c->Generate(long_request, [](const psa::v1::GenerateResponse&) {
    return false;  // stop at the first chunk
  });
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->finish_reason, "cancelled");
  EXPECT_LT(cancelled->token_ids.size(), 400u);

  auto bad = client::TextPrompt("hello", 100000);
  auto refused = c->Generate(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("context limit"));

  auto nowhere = Connect("127.0.0.1:1");
  const absl::Time start = absl::Now();
  auto info = nowhere->GetModelInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(info.status().message(), HasSubstr("127.0.0.1:1"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));

  auto tokens = c->Tokenize("hello world");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_FALSE(tokens->empty());
  auto model_info = c->GetModelInfo();
  ASSERT_TRUE(model_info.ok());
  EXPECT_EQ(model_info->max_context(), 512u);
}

TEST_F(ClientTest, PsactlCommands) {
  std::string out;
  EXPECT_EQ(Psactl("info", &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("max context  512"));
  EXPECT_EQ(Psactl("tokenize 'hello world'", &out), 0) << out;
  EXPECT_THAT(out, ::testing::MatchesRegex("[0-9 ]+\n"));
  EXPECT_EQ(Psactl("generate --raw --max_tokens=5 --attention=dense hello", &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("5 tokens generated"));
  EXPECT_EQ(Psactl("generate --attention=bogus hi", &out), 1);
  EXPECT_THAT(out, HasSubstr("--attention must be dense, topk or psa"));
  EXPECT_EQ(Psactl(absl::StrCat("--metrics=127.0.0.1:", worker_->port("metrics_port"), " stats"),
                   &out),
            0)
      << out;
  EXPECT_THAT(out, ::testing::ContainsRegex("tokens +[0-9]+ prompt, [1-9][0-9]* generated"));
  EXPECT_EQ(Psactl("stats", &out), 1);
  EXPECT_THAT(out, HasSubstr("--metrics=HOST:PORT"));
  EXPECT_EQ(Psactl("frobnicate", &out), 1);
  EXPECT_THAT(out, HasSubstr("unknown command"));
}

}  // namespace
}  // namespace psa
