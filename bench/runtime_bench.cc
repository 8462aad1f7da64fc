// psa_runtime_bench: prefill and decode throughput of the CPU runtime on a
// GGUF model, at several context lengths and batch sizes. Prints a table, or
// with --json one object that bench/compare_llamacpp.py sets side by side
// with llama.cpp's figures on the same model and threads.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/flags_main.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/runtime/sampler.h"

ABSL_FLAG(std::string, model, "", "GGUF model file (required).");
ABSL_FLAG(int, threads, 2, "CPU threads.");
ABSL_FLAG(std::string, contexts, "512,2048,8192", "Context lengths to measure.");
ABSL_FLAG(std::string, batches, "1,8,32", "Decode batch sizes (concurrent sequences).");
ABSL_FLAG(int, decode_tokens, 32, "Decode steps timed per configuration.");
ABSL_FLAG(int, prefill_chunk, 512, "Rows per forward pass during prefill.");
ABSL_FLAG(int, reps, 3,
          "Timed repetitions per configuration up to context 2048 (longer ones run once); "
          "the fastest is reported.");
ABSL_FLAG(bool, json, false, "Print one JSON object instead of a table.");
ABSL_FLAG(bool, step_times, false,
          "Print every timed decode step's milliseconds to stderr (one line per "
          "configuration and repetition), e.g. to see one-off costs of the first steps.");

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(p, &v) || v <= 0) {
      std::cerr << "error: bad list element '" << p << "' in '" << s << "'\n";
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

// Minor page faults of this process so far (first touches of fresh memory).
long MinorFaults() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

void Die(const absl::Status& s) {
  std::cerr << "error: " << s.message() << "\n";
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  psa::ParseFlags(
      argc, argv,
      "Measures prefill and batched decode tokens/s of the CPU runtime.\n"
      "  psa_runtime_bench --model M.gguf --threads 2 [--json]");
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) {
    std::cerr << "error: --model is required\n";
    return 2;
  }
  const std::vector<int> contexts = ParseList(absl::GetFlag(FLAGS_contexts));
  const std::vector<int> batches = ParseList(absl::GetFlag(FLAGS_batches));
  const int n_decode = absl::GetFlag(FLAGS_decode_tokens);
  const bool json = absl::GetFlag(FLAGS_json);
  const bool step_times = absl::GetFlag(FLAGS_step_times);

  auto model = psa::LlamaModel::Load(path);
  if (!model.ok()) Die(model.status());
  const psa::LlamaHparams& hp = (*model)->hparams();
  psa::RuntimeOptions opts;
  opts.threads = absl::GetFlag(FLAGS_threads);
  opts.max_batch_tokens = absl::GetFlag(FLAGS_prefill_chunk);
  // Like llama.cpp's bench, allow the decode steps to run past the training
  // context at the longest context.
  opts.max_context = (*model)->hparams().n_ctx_train;
  for (int c : contexts) opts.max_context = std::max(opts.max_context, c + n_decode);
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  psa::LlamaRuntime rt(**model, opts);
  std::cerr << (*model)->Describe() << " [" << psa::MatMulIsa() << ", " << opts.threads
            << " threads]\n";

  // Random ordinary tokens: speed does not depend on the text.
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> tok(100, hp.n_vocab - 1);
  std::vector<float> logits;

  // Warm up: page the weights in, start the threads.
  {
    psa::KvCache kv = rt.NewCache();
    std::vector<psa::TokenId> w(64);
    for (auto& t : w) t = tok(rng);
    if (auto s = rt.Prefill(&kv, w, &logits); !s.ok()) Die(s);
  }

  std::map<int, double> prefill_tps;
  std::map<int, std::map<int, double>> decode_tps;  // batch -> ctx -> tps
  for (int ctx : contexts) {
    if (ctx + n_decode > rt.max_context()) {
      std::cerr << "skip context " << ctx << ": over the model's limit\n";
      continue;
    }
    std::vector<psa::TokenId> prompt(ctx);
    for (auto& t : prompt) t = tok(rng);
    psa::KvCache base = rt.NewCache();
    double sp = 1e30;
    // Long prefills are slow enough to be stable: repeat only short ones.
    for (int r = 0; r < (ctx <= 2048 ? reps : 1); ++r) {
      base = rt.NewCache();
      const auto t0 = Clock::now();
      if (auto s = rt.Prefill(&base, prompt, &logits); !s.ok()) Die(s);
      sp = std::min(sp, Seconds(t0, Clock::now()));
    }
    prefill_tps[ctx] = ctx / sp;
    std::cerr << "prefill " << ctx << ": " << sp << " s, " << ctx / sp << " tokens/s\n";

    for (int b : batches) {
      double sd = 1e30;
      for (int r = 0; r < (ctx <= 2048 ? reps : 1); ++r) {
        std::vector<psa::KvCache> caches(b, base);  // every sequence holds ctx tokens
        std::vector<psa::TokenId> next(b);
        for (auto& t : next) t = tok(rng);
        std::vector<psa::BatchEntry> batch(b);
        std::vector<double> step_ms;
        std::vector<long> step_faults;
        const auto d0 = Clock::now();
        for (int step = 0; step < n_decode; ++step) {
          const auto s0 = step_times ? Clock::now() : d0;
          const long f0 = step_times ? MinorFaults() : 0;
          for (int i = 0; i < b; ++i) {
            batch[i].kv = &caches[i];
            batch[i].tokens = {&next[i], 1};
          }
          if (auto s = rt.Forward(batch, &logits); !s.ok()) Die(s);
          for (int i = 0; i < b; ++i) {
            next[i] = psa::ArgMax(&logits[static_cast<size_t>(i) * hp.n_vocab], hp.n_vocab);
          }
          if (step_times) {
            step_ms.push_back(1e3 * Seconds(s0, Clock::now()));
            step_faults.push_back(MinorFaults() - f0);
          }
        }
        sd = std::min(sd, Seconds(d0, Clock::now()));
        if (step_times) {
          std::string line = absl::StrCat("step ms batch ", b, " ctx ", ctx, " rep ", r, ":");
          for (double ms : step_ms) absl::StrAppend(&line, " ", absl::SixDigits(ms));
          absl::StrAppend(&line, "\nstep page faults batch ", b, " ctx ", ctx, " rep ", r, ":");
          for (long f : step_faults) absl::StrAppend(&line, " ", f);
          std::cerr << line << "\n";
        }
      }
      decode_tps[b][ctx] = static_cast<double>(b) * n_decode / sd;
      std::cerr << "decode batch " << b << " ctx " << ctx << ": " << decode_tps[b][ctx]
                << " tokens/s\n";
    }
  }

  if (json) {
    std::string out = absl::StrCat("{\"impl\": \"psa-serve\", \"isa\": \"", psa::MatMulIsa(),
                                   "\", \"threads\": ", opts.threads, ", \"prefill_tps\": {");
    std::vector<std::string> parts;
    for (auto& [c, v] : prefill_tps) parts.push_back(absl::StrCat("\"", c, "\": ", v));
    absl::StrAppend(&out, absl::StrJoin(parts, ", "), "}, \"decode_tps\": {");
    parts.clear();
    for (auto& [b, m] : decode_tps) {
      std::vector<std::string> inner;
      for (auto& [c, v] : m) inner.push_back(absl::StrCat("\"", c, "\": ", v));
      parts.push_back(absl::StrCat("\"", b, "\": {", absl::StrJoin(inner, ", "), "}"));
    }
    absl::StrAppend(&out, absl::StrJoin(parts, ", "), "}}");
    std::cout << out << "\n";
  } else {
    std::printf("%-10s %8s %14s\n", "phase", "context", "tokens/s");
    for (auto& [c, v] : prefill_tps) std::printf("%-10s %8d %14.1f\n", "prefill", c, v);
    for (auto& [b, m] : decode_tps) {
      for (auto& [c, v] : m) {
        std::printf("%-10s %8d %14.1f\n", absl::StrCat("decode x", b).c_str(), c, v);
      }
    }
  }
  return 0;
}
