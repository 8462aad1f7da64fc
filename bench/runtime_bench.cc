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
#include "compute_worker/attention/prefill_attention.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/runtime/sampler.h"

ABSL_FLAG(std::string, model, "",
          "GGUF model file or registered name (scripts/fetch_model.sh --list) (required).");
ABSL_FLAG(int, threads, 2, "CPU threads.");
ABSL_FLAG(std::string, contexts, "512,2048,8192", "Context lengths to measure.");
ABSL_FLAG(std::string, batches, "1,8,32", "Decode batch sizes (concurrent sequences).");
ABSL_FLAG(int, decode_tokens, 32, "Decode steps timed per configuration.");
ABSL_FLAG(int, prefill_chunk, 512, "Rows per forward pass during prefill.");
ABSL_FLAG(int, reps, 3,
          "Timed repetitions of every prefill and of every configuration's decode steps; "
          "the median is reported (and the fastest as \"best\"). The method is "
          "bench/llamacpp_bench.py's: one 512-token warm-up prefill, then per context "
          "--reps prefills from an empty cache; per batch size the prefilled context is "
          "copied to every sequence, one untimed decode step runs, then --reps runs of "
          "--decode_tokens steps continuing the same sequences.");
ABSL_FLAG(bool, json, false, "Print one JSON object instead of a table.");
ABSL_FLAG(bool, fast_prefill, true,
          "Prompt chunks through the tiled prefill attention, as served "
          "(prefill_attention.h); --nofast_prefill measures the row-at-a-time path.");
ABSL_FLAG(bool, tile_gemm, true,
          "Batches of 16+ rows through the AVX-512 tile GEMM, as served (kquant_gemm.h); "
          "--notile_gemm measures the per-row kernels alone.");
ABSL_FLAG(bool, step_times, false,
          "Print every timed decode step's milliseconds to stderr (one line per "
          "configuration and repetition), e.g. to see one-off costs of the first steps.");

namespace {

using Clock = std::chrono::steady_clock;

// Of repeated timings: the median (the mean of the middle two for an even
// count) and the fastest.
struct Stat {
  double median = 0, best = 0;
};

Stat Summarize(std::vector<double> seconds) {
  std::sort(seconds.begin(), seconds.end());
  const size_t n = seconds.size();
  return {n % 2 == 1 ? seconds[n / 2] : 0.5 * (seconds[n / 2 - 1] + seconds[n / 2]), seconds[0]};
}

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
  psa::SetTileGemmEnabled(absl::GetFlag(FLAGS_tile_gemm));
  psa::SetTiledPrefillAttentionEnabled(absl::GetFlag(FLAGS_fast_prefill));
  const bool json = absl::GetFlag(FLAGS_json);
  const bool step_times = absl::GetFlag(FLAGS_step_times);

  auto model = psa::LlamaModel::Load(path);
  if (!model.ok()) Die(model.status());
  const psa::LlamaHparams& hp = (*model)->hparams();
  psa::RuntimeOptions opts;
  opts.threads = absl::GetFlag(FLAGS_threads);
  opts.max_batch_tokens = absl::GetFlag(FLAGS_prefill_chunk);
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  // Like llama.cpp's bench, allow the decode steps (one warm-up, then reps
  // runs) to run past the training context at the longest context.
  const int decode_len = 1 + reps * n_decode;
  opts.max_context = (*model)->hparams().n_ctx_train;
  for (int c : contexts) opts.max_context = std::max(opts.max_context, c + decode_len);
  psa::LlamaRuntime rt(**model, opts);
  std::cerr << (*model)->Describe() << " [" << psa::MatMulIsa() << ", " << opts.threads
            << " threads]\n";

  // Random ordinary tokens: speed does not depend on the text.
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> tok(100, hp.n_vocab - 1);
  std::vector<float> logits;

  // Warm up: page the weights in, start the threads (one 512-token prefill,
  // as llamacpp_bench.py).
  {
    psa::KvCache kv = rt.NewCache();
    std::vector<psa::TokenId> w(512);
    for (auto& t : w) t = tok(rng);
    if (auto s = rt.Prefill(&kv, w, &logits); !s.ok()) Die(s);
  }

  std::map<int, Stat> prefill_tps;
  std::map<int, std::map<int, Stat>> decode_tps;  // batch -> ctx -> tokens/s
  for (int ctx : contexts) {
    if (ctx + decode_len > rt.max_context()) {
      std::cerr << "skip context " << ctx << ": over the model's limit\n";
      continue;
    }
    std::vector<psa::TokenId> prompt(ctx);
    for (auto& t : prompt) t = tok(rng);
    psa::KvCache base = rt.NewCache();
    std::vector<double> sp;
    for (int r = 0; r < reps; ++r) {
      base = rt.NewCache();
      const auto t0 = Clock::now();
      if (auto s = rt.Prefill(&base, prompt, &logits); !s.ok()) Die(s);
      sp.push_back(Seconds(t0, Clock::now()));
      std::cerr << "prefill " << ctx << " rep " << r << ": " << sp.back() << " s, "
                << ctx / sp.back() << " tokens/s\n";
    }
    const Stat ps = Summarize(sp);
    prefill_tps[ctx] = {ctx / ps.median, ctx / ps.best};

    for (int b : batches) {
      std::vector<psa::KvCache> caches(b, base);  // every sequence holds ctx tokens
      std::vector<psa::TokenId> next(b);
      for (auto& t : next) t = tok(rng);
      std::vector<psa::BatchEntry> batch(b);
      auto step = [&] {
        for (int i = 0; i < b; ++i) {
          batch[i].kv = &caches[i];
          batch[i].tokens = {&next[i], 1};
        }
        if (auto s = rt.Forward(batch, &logits); !s.ok()) Die(s);
        for (int i = 0; i < b; ++i) {
          next[i] = psa::ArgMax(&logits[static_cast<size_t>(i) * hp.n_vocab], hp.n_vocab);
        }
      };
      std::vector<double> step_ms;
      std::vector<long> step_faults;
      auto timed_step = [&] {
        const auto s0 = Clock::now();
        const long f0 = MinorFaults();
        step();
        step_ms.push_back(1e3 * Seconds(s0, Clock::now()));
        step_faults.push_back(MinorFaults() - f0);
      };
      auto print_steps = [&](const std::string& what) {
        std::string line = absl::StrCat("step ms batch ", b, " ctx ", ctx, " ", what, ":");
        for (double ms : step_ms) absl::StrAppend(&line, " ", absl::SixDigits(ms));
        absl::StrAppend(&line, "\nstep page faults batch ", b, " ctx ", ctx, " ", what, ":");
        for (long f : step_faults) absl::StrAppend(&line, " ", f);
        std::cerr << line << "\n";
        step_ms.clear();
        step_faults.clear();
      };
      // One untimed warm-up step (llamacpp_bench.py's too).
      if (step_times) {
        timed_step();
        print_steps("warm-up");
      } else {
        step();
      }
      std::vector<double> sd;
      for (int r = 0; r < reps; ++r) {
        const auto d0 = Clock::now();
        for (int k = 0; k < n_decode; ++k) step_times ? timed_step() : step();
        sd.push_back(Seconds(d0, Clock::now()));
        if (step_times) print_steps(absl::StrCat("rep ", r));
      }
      const Stat ds = Summarize(sd);
      decode_tps[b][ctx] = {b * n_decode / ds.median, b * n_decode / ds.best};
      std::cerr << "decode batch " << b << " ctx " << ctx << ": " << decode_tps[b][ctx].median
                << " tokens/s (median of " << reps << "), best " << decode_tps[b][ctx].best
                << "\n";
    }
  }

  const std::string stat = absl::StrCat(
      "median of ", reps, " timed repetitions (best: the fastest) after one 512-token warm-up "
      "prefill; decode: one untimed warm-up step, then repetitions of ", n_decode,
      " steps continuing the same sequences");
  if (json) {
    auto json_map = [](const std::map<int, Stat>& m, double Stat::*field) {
      std::vector<std::string> parts;
      for (auto& [c, v] : m) parts.push_back(absl::StrCat("\"", c, "\": ", v.*field));
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    };
    auto json_nested = [&](double Stat::*field) {
      std::vector<std::string> parts;
      for (auto& [b, m] : decode_tps) parts.push_back(absl::StrCat("\"", b, "\": ", json_map(m, field)));
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    };
    std::cout << absl::StrCat(
        "{\"impl\": \"psa-serve\", \"isa\": \"", psa::MatMulIsa(), "\", \"threads\": ", opts.threads,
        ", \"prefill_tps\": ", json_map(prefill_tps, &Stat::median),
        ", \"decode_tps\": ", json_nested(&Stat::median),
        ", \"prefill_tps_best\": ", json_map(prefill_tps, &Stat::best),
        ", \"decode_tps_best\": ", json_nested(&Stat::best), ", \"meta\": {\"reps\": ", reps,
        ", \"decode_tokens\": ", n_decode, ", \"warmup_prefill_tokens\": 512",
        ", \"decode_warmup_steps\": 1, \"stat\": \"median\", \"stat_text\": \"", stat, "\"}}")
              << "\n";
  } else {
    std::printf("tokens/s: %s\n", stat.c_str());
    std::printf("%-10s %8s %14s %14s\n", "phase", "context", "tokens/s", "best");
    for (auto& [c, v] : prefill_tps) {
      std::printf("%-10s %8d %14.1f %14.1f\n", "prefill", c, v.median, v.best);
    }
    for (auto& [b, m] : decode_tps) {
      for (auto& [c, v] : m) {
        std::printf("%-10s %8d %14.1f %14.1f\n", absl::StrCat("decode x", b).c_str(), c, v.median,
                    v.best);
      }
    }
  }
  return 0;
}
