// Shared by the worker_test binary's files: a real psa-worker process on
// loopback (Worker), request builders, and the tiny-model fixture. Test
// code; each test owns its Worker; not thread-safe unless said.
#ifndef PSA_TESTS_INTEGRATION_WORKER_TESTING_H_
#define PSA_TESTS_INTEGRATION_WORKER_TESTING_H_

#include <signal.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "api/resume_auth.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/attention/sparse_attention.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "common/http_get.h"
#include "tests/support/generate_stream.h"
#include "tests/support/reference_generation.h"
#include "tests/support/resume_secret.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace worker_testing {

using psa::testing::ServerProcess;
using ::testing::HasSubstr;

using psa::testing::Streamed;

// A worker process; it takes resumes signed with the test secret
// (GenerateResumed) unless `extra` names another --resume_secret_file.
class Worker {
 public:
  Worker(const std::string& model, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--model=" + model, "--listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0", "--threads=2",
                                     psa::testing::ResumeSecretFlag()};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = ServerProcess::Start(PSA_WORKER_BIN, args, absl::Seconds(60));
    EXPECT_TRUE(p.ok()) << p.status();
    process_ = std::move(*p);
    stub_ = psa::v1::Generation::NewStub(
        grpc::CreateChannel(process_->address(), grpc::InsecureChannelCredentials()));
  }

  Streamed Generate(const psa::v1::GenerateRequest& request,
                    absl::Duration timeout = absl::Seconds(120), int cancel_after = -1) {
    return psa::testing::StreamGenerate(
        process_->address(), request, timeout, [cancel_after](const Streamed& so_far) {
          return cancel_after < 0 || static_cast<int>(so_far.tokens.size()) < cancel_after;
        });
  }

  // `request` (with a resume) signed as the router signs it.
  Streamed GenerateResumed(const psa::v1::GenerateRequest& request,
                           absl::Duration timeout = absl::Seconds(120)) {
    const ResumeAuth auth(psa::testing::kResumeSecret);
    return psa::testing::StreamGenerate(process_->address(), request, timeout, nullptr,
                                        {{ResumeAuth::kMetadataKey, auth.Sign(request)}});
  }

  // Every request on its own client thread at once; results in order.
  std::vector<Streamed> GenerateConcurrently(
      const std::vector<psa::v1::GenerateRequest>& requests) {
    std::vector<Streamed> results(requests.size());
    std::vector<std::thread> clients;
    for (size_t i = 0; i < requests.size(); ++i) {
      clients.emplace_back([&, i] { results[i] = Generate(requests[i]); });
    }
    for (auto& c : clients) c.join();
    return results;
  }

  double Metric(const std::string& series) {
    auto body = psa::HttpGet(process_->port("metrics_port"), "/metrics");
    return body.ok() ? psa::MetricValue(*body, series) : -2;
  }

  psa::v1::Generation::Stub* stub() { return stub_.get(); }
  std::string address() const { return process_->address(); }
  pid_t pid() const { return process_->pid(); }

 private:
  std::unique_ptr<ServerProcess> process_;
  std::unique_ptr<psa::v1::Generation::Stub> stub_;
};

inline psa::v1::GenerateRequest IdsRequest(const std::vector<TokenId>& prompt, int max_tokens,
                                    psa::v1::AttentionPolicy::Kind kind) {
  psa::v1::GenerateRequest r;
  r.mutable_token_ids();  // set even when empty
  for (TokenId t : prompt) r.mutable_token_ids()->add_ids(t);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  r.mutable_attention()->set_kind(kind);
  return r;
}

inline std::vector<TokenId> Prompt(int n, int vocab, uint32_t seed) {
  std::vector<TokenId> p;
  uint32_t x = seed * 2654435761u + 7;
  for (int i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    p.push_back(static_cast<TokenId>(x % vocab));
  }
  return p;
}

class TinyWorkerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    psa::testing::TinyModelSpec spec;
    spec.n_ctx = 1024;
    path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "worker.gguf"));
    model_ = LlamaModel::Load(*path_)->release();
    // Slow enough (a few thousand tokens/s) for cancellation to land mid-way.
    psa::testing::TinyModelSpec slow;
    slow.n_layer = 4;
    slow.n_embd = 256;
    slow.n_ff = 1024;
    slow.n_ctx = 4096;
    slow_path_ = new std::string(
        psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(slow), "slow.gguf"));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete path_;
    delete slow_path_;
  }
  // What the in-process runtime generates (greedy, ignoring EOS).
  static std::vector<TokenId> Reference(const std::vector<TokenId>& prompt, int max_tokens,
                                        const AttentionPolicy& policy) {
    return psa::testing::ReferenceTokens(*model_, prompt, max_tokens, policy);
  }
  int vocab() const { return model_->hparams().n_vocab; }

  inline static std::string* path_ = nullptr;
  inline static std::string* slow_path_ = nullptr;
  inline static LlamaModel* model_ = nullptr;
};

inline AttentionPolicy Dense() { return psa::testing::DensePolicy(); }

// The worker re-executes itself so that libgomp (which reads its settings

inline std::string DefaultModelPath() {
  if (const char* p = std::getenv("PSA_MODEL")) return p;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/root") +
         "/.cache/psa-serve/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace worker_testing
}  // namespace psa

#endif  // PSA_TESTS_INTEGRATION_WORKER_TESTING_H_
