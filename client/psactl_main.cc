// psactl: the PSA-Serve command line.
//   psactl [--target=HOST:PORT] generate "PROMPT"     stream a completion
//   psactl chat                                       talk turn by turn (stdin)
//   psactl tokenize "TEXT"                            token ids of TEXT
//   psactl info                                       the served model
//   psactl --metrics=HOST:PORT stats                  traffic, latency, health
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "api/attention_policy_proto.h"
#include "client/psa_client.h"
#include "common/flags_main.h"
#include "common/http_get.h"

ABSL_FLAG(std::string, target, "localhost:7000", "Router (or worker) address, host:port");
ABSL_FLAG(std::string, api_key, "",
          "API key for a router started with --api_keys_file (default: $PSA_API_KEY)");
ABSL_FLAG(std::string, tls_ca_file, "",
          "Connect with TLS, trusting this CA certificate (PEM); empty: plaintext");
ABSL_FLAG(int, max_tokens, 256, "Tokens to generate at most");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature (0: greedy)");
ABSL_FLAG(int, top_k, 0, "Sample among the k most likely tokens (0: all)");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling mass");
ABSL_FLAG(int64_t, seed, 0, "Sampling seed");
ABSL_FLAG(double, repetition_penalty, 0,
          "vLLM's repetition penalty, > 0: logits of prompt and generated tokens are divided by "
          "it if positive, multiplied if negative (1: off; 1.1-1.2 curbs loops). 0: the "
          "command's default: 1.15 for chat (greedy SmolLM2 otherwise repeats a line), off "
          "for generate");
ABSL_FLAG(double, frequency_penalty, 0,
          "OpenAI's frequency penalty in [-2, 2], per time a token was generated (0: off)");
ABSL_FLAG(double, presence_penalty, 0,
          "OpenAI's presence penalty in [-2, 2], once per token generated (0: off)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Stop strings (comma-separated)");
ABSL_FLAG(std::string, attention, "",
          "Attention policy: dense, topk or psa, optionally with eps or k, e.g. psa:eps=0.95 or "
          "topk:k=128 (empty: the server's default)");
ABSL_FLAG(double, epsilon, 0, "psa: attention mass to capture (0: the server's default)");
ABSL_FLAG(bool, raw, false, "generate: send the prompt as is, not as a chat user message");
ABSL_FLAG(std::string, system, "", "chat/generate: a system message");
ABSL_FLAG(int, timeout_s, 300, "Deadline of each call, seconds");
ABSL_FLAG(bool, stats, true, "Print token counts, speed and KV read to stderr");
ABSL_FLAG(std::string, metrics, "",
          "stats: the router's (or a worker's) metrics address, host:port");

namespace {

// chat's --repetition_penalty when not given.
constexpr float kChatRepetitionPenalty = 1.15f;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "psactl: %s: %s\n", absl::StatusCodeToString(s.code()).c_str(),
               std::string(s.message()).c_str());
  return 1;
}

absl::Status ApplyFlags(psa::v1::GenerateRequest* r) {
  r->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  r->mutable_sampling()->set_temperature(absl::GetFlag(FLAGS_temperature));
  r->mutable_sampling()->set_top_k(absl::GetFlag(FLAGS_top_k));
  r->mutable_sampling()->set_top_p(absl::GetFlag(FLAGS_top_p));
  r->mutable_sampling()->set_seed(absl::GetFlag(FLAGS_seed));
  r->mutable_sampling()->set_repetition_penalty(absl::GetFlag(FLAGS_repetition_penalty));
  r->mutable_sampling()->set_frequency_penalty(absl::GetFlag(FLAGS_frequency_penalty));
  r->mutable_sampling()->set_presence_penalty(absl::GetFlag(FLAGS_presence_penalty));
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) r->add_stop(s);
  // The request's policy: --attention's kind and knobs, eps and k left 0
  // (the server's) unless named; --epsilon over it when given.
  const std::string a = absl::GetFlag(FLAGS_attention);
  if (!a.empty()) {
    absl::StatusOr<psa::AttentionPolicy> policy =
        psa::AttentionPolicy::Parse(a, psa::ClientUnsetPolicy());
    if (!policy.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--attention ", policy.status().message()));
    }
    absl::StatusOr<psa::v1::AttentionPolicy> wire =
        psa::PolicyToProto(*policy, psa::ClientUnsetPolicy());
    if (!wire.ok()) return wire.status();
    *r->mutable_attention() = *wire;
  }
  if (absl::GetFlag(FLAGS_epsilon) != 0) {
    r->mutable_attention()->set_epsilon(absl::GetFlag(FLAGS_epsilon));
  }
  return absl::OkStatus();
}

// Streams one generation to stdout; returns its completion.
absl::StatusOr<psa::client::Completion> Stream(psa::client::Client& client,
                                               const psa::v1::GenerateRequest& request) {
  const absl::Time start = absl::Now();
  auto done = client.Generate(request, [](const psa::v1::GenerateResponse& chunk) {
    std::cout << chunk.text() << std::flush;
    return true;
  });
  if (!done.ok()) return done;
  std::cout << "\n" << std::flush;
  if (absl::GetFlag(FLAGS_stats)) {
    const psa::v1::Usage& u = done->usage;
    const double total = absl::ToDoubleSeconds(absl::Now() - start);
    const double first = u.time_to_first_token_seconds();
    const double decode = std::max(total - first, 1e-9);
    std::string kv;
    if (u.kv_blocks_total() > 0) {
      kv = absl::StrFormat("; attention %s read %.1f%% of the KV dense would", u.attention(),
                           100.0 * u.kv_blocks_touched() / u.kv_blocks_total());
    }
    std::fprintf(stderr,
                 "[prompt %u tokens, first token after %.2f s; %u tokens generated at %.1f "
                 "tok/s (%s)%s]\n",
                 u.prompt_tokens(), first, u.completion_tokens(),
                 u.completion_tokens() > 1 ? (u.completion_tokens() - 1) / decode : 0.0,
                 done->finish_reason.c_str(), kv.c_str());
  }
  return done;
}

// Sum of every sample of `name` (any labels) in a Prometheus exposition.
double Sum(const std::string& text, const std::string& name) {
  double total = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const absl::string_view rest = line.substr(name.size());
    if (rest.empty() || (rest[0] != ' ' && rest[0] != '{')) continue;
    double v;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) total += v;
  }
  return total;
}

int Stats() {
  const std::string target = absl::GetFlag(FLAGS_metrics);
  const size_t colon = target.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(target.substr(colon + 1), &port)) {
    return Fail(absl::InvalidArgumentError(
        "stats needs --metrics=HOST:PORT (the router's or a worker's --metrics_listen)"));
  }
  auto text = psa::HttpGet(target.substr(0, colon), port, "/metrics");
  if (!text.ok()) return Fail(text.status());
  auto mean = [&](const std::string& histogram) {
    const double n = Sum(*text, histogram + "_count");
    return n > 0 ? Sum(*text, histogram + "_sum") / n : 0.0;
  };
  if (absl::StrContains(*text, "psa_router_")) {
    std::printf("requests finished   %.0f (OK %.0f)\n", Sum(*text, "psa_router_requests_total"),
                psa::MetricValue(*text, "psa_router_requests_total{code=\"OK\"}"));
    std::printf("active              %.0f\n", Sum(*text, "psa_router_requests_active"));
    std::printf("mean TTFT           %.3f s\n", mean("psa_router_time_to_first_token_seconds"));
    std::printf("mean e2e latency    %.3f s\n", mean("psa_router_e2e_request_latency_seconds"));
    std::printf("retries / resumes   %.0f / %.0f\n", Sum(*text, "psa_router_retries_total"),
                Sum(*text, "psa_router_resumes_total"));
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      // psa_router_worker_healthy{worker="host:port"} 1
      if (!absl::StartsWith(line, "psa_router_worker_healthy{worker=\"")) continue;
      const size_t begin = line.find('"') + 1, end = line.find('"', begin);
      const bool up = absl::EndsWith(line, " 1");
      std::printf("worker %-21s %s\n", std::string(line.substr(begin, end - begin)).c_str(),
                  up ? "healthy" : "DOWN");
    }
  } else if (absl::StrContains(*text, "psa_worker_")) {
    std::printf("running / waiting   %.0f / %.0f\n", Sum(*text, "psa_worker_requests_running"),
                Sum(*text, "psa_worker_requests_waiting"));
    std::printf("requests finished   %.0f\n", Sum(*text, "psa_worker_requests_total"));
    std::printf("tokens              %.0f prompt, %.0f generated\n",
                Sum(*text, "psa_worker_prompt_tokens_total"),
                Sum(*text, "psa_worker_generation_tokens_total"));
    std::printf("mean TTFT           %.3f s\n", mean("psa_worker_time_to_first_token_seconds"));
    std::printf("mean inter-token    %.4f s\n", mean("psa_worker_inter_token_latency_seconds"));
    const double dense = Sum(*text, "psa_worker_attention_kv_blocks_dense_total");
    std::printf("KV read vs dense    %.1f%%\n",
                dense > 0 ? 100 * Sum(*text, "psa_worker_attention_kv_blocks_read_total") / dense
                          : 100.0);
    std::printf("prefix cache hits   %.0f of %.0f prompt tokens\n",
                Sum(*text, "psa_worker_prefix_cache_hits_total"),
                Sum(*text, "psa_worker_prefix_cache_queries_total"));
  } else {
    return Fail(absl::NotFoundError(absl::StrCat(target, " serves no PSA-Serve metrics")));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args = psa::ParseFlags(
      argc, argv,
      "The PSA-Serve command line.\n"
      "  psactl [flags] generate PROMPT   stream a completion (PROMPT '-' reads stdin)\n"
      "  psactl [flags] chat              talk turn by turn; one line per turn, EOF ends\n"
      "  psactl [flags] tokenize TEXT     print the token ids of TEXT\n"
      "  psactl [flags] info              describe the served model\n"
      "  psactl --metrics=HOST:PORT stats a summary of a router's or worker's metrics");
  if (args.size() < 2) {
    absl::FPrintF(stderr, "%s\n(psactl --help lists the flags)\n", absl::ProgramUsageMessage());
    return 2;
  }
  const std::string command = args[1];
  psa::client::ClientOptions options;
  options.target = absl::GetFlag(FLAGS_target);
  options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_s));
  options.api_key = absl::GetFlag(FLAGS_api_key);
  if (const char* env = std::getenv("PSA_API_KEY"); options.api_key.empty() && env != nullptr) {
    options.api_key = env;
  }
  if (const std::string ca = absl::GetFlag(FLAGS_tls_ca_file); !ca.empty()) {
    std::ifstream in(ca);
    if (!in) return Fail(absl::NotFoundError("cannot read --tls_ca_file " + ca));
    options.tls = true;
    options.tls_root_certs.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto client = psa::client::Client::Connect(options);
  if (!client.ok()) return Fail(client.status());

  if (command == "generate") {
    if (args.size() != 3) return Fail(absl::InvalidArgumentError("generate takes one PROMPT"));
    std::string prompt = args[2];
    if (prompt == "-") prompt.assign(std::istreambuf_iterator<char>(std::cin), {});
    psa::v1::GenerateRequest request;
    if (absl::GetFlag(FLAGS_raw)) {
      request.set_text(prompt);
    } else {
      if (!absl::GetFlag(FLAGS_system).empty()) {
        auto* m = request.mutable_chat()->add_messages();
        m->set_role("system");
        m->set_content(absl::GetFlag(FLAGS_system));
      }
      auto* m = request.mutable_chat()->add_messages();
      m->set_role("user");
      m->set_content(prompt);
    }
    if (absl::Status s = ApplyFlags(&request); !s.ok()) return Fail(s);
    auto done = Stream(**client, request);
    return done.ok() ? 0 : Fail(done.status());
  }
  if (command == "chat") {
    psa::v1::GenerateRequest request;
    if (!absl::GetFlag(FLAGS_system).empty()) {
      auto* m = request.mutable_chat()->add_messages();
      m->set_role("system");
      m->set_content(absl::GetFlag(FLAGS_system));
    }
    if (absl::Status s = ApplyFlags(&request); !s.ok()) return Fail(s);
    if (request.sampling().repetition_penalty() == 0) {
      // A mild penalty by default: greedy SmolLM2-135M repeats one line of
      // a poem until max_tokens without it, and 1.1 is not enough.
      request.mutable_sampling()->set_repetition_penalty(kChatRepetitionPenalty);
    }
    std::string line;
    while (std::fprintf(stderr, "> "), std::getline(std::cin, line)) {
      if (line.empty()) continue;
      auto* m = request.mutable_chat()->add_messages();
      m->set_role("user");
      m->set_content(line);
      auto done = Stream(**client, request);
      if (!done.ok()) return Fail(done.status());
      auto* reply = request.mutable_chat()->add_messages();
      reply->set_role("assistant");
      reply->set_content(done->text);
    }
    return 0;
  }
  if (command == "tokenize") {
    if (args.size() != 3) return Fail(absl::InvalidArgumentError("tokenize takes one TEXT"));
    auto ids = (*client)->Tokenize(args[2]);
    if (!ids.ok()) return Fail(ids.status());
    std::cout << absl::StrJoin(*ids, " ") << "\n";
    return 0;
  }
  if (command == "info") {
    auto info = (*client)->GetModelInfo();
    if (!info.ok()) return Fail(info.status());
    std::cout << "model        " << info->name() << "\n"
              << "model_id     " << info->model_id() << "\n"
              << "layers       " << info->num_layers() << "\n"
              << "heads        " << info->num_heads() << " (" << info->num_kv_heads()
              << " KV), head dim " << info->head_dim() << "\n"
              << "vocab        " << info->vocab_size() << "\n"
              << "max context  " << info->max_context() << "\n"
              << "attention    " << info->default_attention() << "\n";
    return 0;
  }
  if (command == "stats") return Stats();
  return Fail(absl::InvalidArgumentError(absl::StrCat(
      "unknown command \"", command, "\"; use generate, chat, tokenize, info or stats")));
}
