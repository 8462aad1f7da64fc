// The paper's serving table on this machine: generation throughput and
// per-token latency of a worker whose KV lives in the KV service, with a
// block pool of a fraction (default 25%) of the sequences' KV, for `dense`,
// `topk` and `psa` side by side at the same context and concurrency.
//
// Real processes on loopback: one psa-kv-service and, per concurrency level,
// a fresh psa-worker with --kv_pool for each policy. The long document (essays from
// ../shared/eval/haystack) is prefilled and published once; every sequence
// then starts from its stored prefix (metadata only) plus a short question
// of its own, so each step's attention reads the document's pages through
// the pool: hits, or fetches from the KV service.
//
//   build/bench/psa_serve_bench --context 8192 --concurrency 1,8,32 --tokens 16
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "api/attention_policy_proto.h"
#include "bench/haystack.h"
#include "client/psa_client.h"
#include "common/flags_main.h"
#include "common/http_get.h"
#include "tests/support/server_process.h"

ABSL_FLAG(std::string, model, "smollm2-135m",
          "GGUF model file or registered name (scripts/fetch_model.sh --list)");
ABSL_FLAG(std::string, haystack, "../shared/eval/haystack", "Folder of essay .txt files");
ABSL_FLAG(int, context, 8192, "Tokens of document before each question");
ABSL_FLAG(std::string, concurrency, "1,8,32", "Concurrent sequences, comma-separated");
ABSL_FLAG(std::string, policies, "dense,topk,psa",
          "Attention policies, comma-separated, each as psactl --attention takes it (e.g. "
          "dense,topk:k=128,psa:eps=0.95); --top_k and --epsilon fill what they leave unset");
ABSL_FLAG(int, tokens, 16, "Tokens generated per sequence");
ABSL_FLAG(double, pool_fraction, 0.25, "Block pool size as a fraction of all sequences' KV");
ABSL_FLAG(int, top_k, 64, "topk budget in blocks (bench/README.md's 16-token serving table uses 64)");
ABSL_FLAG(double, epsilon, 0.9, "psa epsilon (the served default)");
ABSL_FLAG(int, threads, 2, "Worker compute threads");
ABSL_FLAG(double, resident_bias, -1,
          "The workers' --psa_resident_bias (negative: their default)");
ABSL_FLAG(int, sparse_prefill_rows, -1,
          "The workers' --sparse_prefill_rows (negative: their default)");
ABSL_FLAG(std::string, csv, "", "Also write the table here");

namespace {

using psa::testing::ServerProcess;

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "psa_serve_bench: %s\n", message.c_str());
  std::exit(1);
}

// The servers this run started. A static, so that std::exit (Die) stops
// them too rather than leaving them running.
std::vector<std::unique_ptr<ServerProcess>>& Servers() {
  static std::vector<std::unique_ptr<ServerProcess>> servers;
  return servers;
}

ServerProcess* Start(const std::string& binary, std::vector<std::string> args) {
  auto p = ServerProcess::Start(binary, std::move(args), absl::Minutes(2));
  if (!p.ok()) Die(std::string(p.status().message()));
  Servers().push_back(std::move(*p));
  return Servers().back().get();
}

void Stop(ServerProcess* server) {
  auto& all = Servers();
  all.erase(std::remove_if(all.begin(), all.end(), [&](const auto& s) { return s.get() == server; }),
            all.end());
}

std::unique_ptr<psa::client::Client> Connect(const std::string& address) {
  psa::client::ClientOptions options;
  options.target = address;
  options.timeout = absl::Minutes(30);
  options.max_attempts = 1;
  auto c = psa::client::Client::Connect(options);
  if (!c.ok()) Die(std::string(c.status().message()));
  return std::move(*c);
}

double Metric(const ServerProcess& p, const std::string& series) {
  auto body = psa::HttpGet(p.port("metrics_port"), "/metrics");
  return body.ok() ? std::max(0.0, psa::MetricValue(*body, series)) : 0;
}

// Waits until the worker's publishing stops moving (the prompt is stored).
void WaitPublished(const ServerProcess& worker) {
  double last = -1;
  for (int stable = 0; stable < 3;) {
    absl::SleepFor(absl::Milliseconds(500));
    const double now = Metric(worker, "psa_worker_kv_write_bytes_total");
    stable = now == last && now > 0 ? stable + 1 : 0;
    last = now;
  }
}

struct Row {
  std::string policy;  // as --policies named it
  psa::v1::AttentionPolicy::Kind kind = psa::v1::AttentionPolicy::KIND_DEFAULT;
  int sequences = 0;
  double tok_per_s = 0;       // decode throughput, all sequences
  double ms_per_token = 0;    // mean gap between a sequence's tokens
  double ttft_s = 0;          // mean
  double kv_read = 0;         // fraction of the KV attention read
  double fetch_mb_per_token = 0;
  double hit_ratio = 0;       // pool hits / stored pages read
  double stall_ms_per_token = 0;
  double unread = 0;          // fetched pages the step that asked never read / fetches
  std::vector<std::vector<uint32_t>> outputs;  // per sequence, greedy tokens
};

// Accuracy in the same run: the share of each sequence's tokens generated
// before it first differs from dense's greedy tokens for the same prompt.
double SameAsDense(const Row& r, const Row& dense) {
  double sum = 0;
  for (size_t i = 0; i < r.outputs.size() && i < dense.outputs.size(); ++i) {
    const auto& a = r.outputs[i];
    const auto& b = dense.outputs[i];
    size_t k = 0;
    while (k < a.size() && k < b.size() && a[k] == b[k]) ++k;
    sum += b.empty() ? 1.0 : static_cast<double>(k) / b.size();
  }
  return r.outputs.empty() ? 0 : sum / r.outputs.size();
}

Row RunPolicy(const std::string& name, const psa::v1::AttentionPolicy& policy, int n,
              const ServerProcess& worker, const std::vector<uint32_t>& document,
              const std::vector<std::vector<uint32_t>>& questions, int tokens) {
  const char* kMetrics[] = {"psa_worker_kv_page_fetch_bytes_total", "psa_worker_kv_page_reads_total",
                            "psa_worker_kv_page_fetches_total",
                            "psa_worker_kv_fetch_stall_seconds_total",
                            "psa_worker_kv_page_fetches_unread_total"};
  constexpr int kN = sizeof(kMetrics) / sizeof(kMetrics[0]);
  double before[kN];
  for (int i = 0; i < kN; ++i) before[i] = Metric(worker, kMetrics[i]);

  struct Seq {
    absl::Time start, first, last;
    int tokens = 0;
    psa::v1::Usage usage;
  };
  std::vector<Seq> seqs(n);
  std::vector<std::vector<uint32_t>> outputs(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      auto client = Connect(worker.address());
      psa::v1::GenerateRequest r;
      for (uint32_t t : document) r.mutable_token_ids()->add_ids(t);
      for (uint32_t t : questions[i % questions.size()]) r.mutable_token_ids()->add_ids(t);
      r.set_max_tokens(tokens);
      r.set_ignore_eos(true);
      *r.mutable_attention() = policy;
      Seq& s = seqs[i];
      s.start = absl::Now();
      auto done = client->Generate(r, [&s](const psa::v1::GenerateResponse& chunk) {
        if (chunk.token_ids_size() > 0) {
          const absl::Time now = absl::Now();
          if (s.tokens == 0) s.first = now;
          s.last = now;
          s.tokens += chunk.token_ids_size();
        }
        return true;
      });
      if (!done.ok()) Die(absl::StrCat(name, " sequence ", i, ": ", done.status().message()));
      s.usage = done->usage;
      outputs[i] = done->token_ids;
    });
  }
  for (auto& t : threads) t.join();

  Row row;
  row.policy = name;
  row.kind = policy.kind();
  row.sequences = n;
  row.outputs = std::move(outputs);
  absl::Time first_any = absl::InfiniteFuture(), last_all = absl::InfinitePast();
  double gaps = 0, ttft = 0, touched = 0, total = 0;
  int decoded = 0;
  for (const Seq& s : seqs) {
    first_any = std::min(first_any, s.first);
    last_all = std::max(last_all, s.last);
    decoded += s.tokens - 1;
    if (s.tokens > 1) gaps += absl::ToDoubleMilliseconds(s.last - s.first) / (s.tokens - 1);
    ttft += absl::ToDoubleSeconds(s.first - s.start);
    touched += s.usage.kv_blocks_touched();
    total += s.usage.kv_blocks_total();
  }
  // Decode throughput: the tokens after each sequence's first, over the time
  // from the earliest first token to the last token.
  row.tok_per_s = decoded / std::max(1e-9, absl::ToDoubleSeconds(last_all - first_any));
  row.ms_per_token = gaps / n;
  row.ttft_s = ttft / n;
  row.kv_read = total > 0 ? touched / total : 0;
  double delta[kN];
  for (int i = 0; i < kN; ++i) delta[i] = Metric(worker, kMetrics[i]) - before[i];
  const double generated = static_cast<double>(n) * tokens;
  row.fetch_mb_per_token = delta[0] / generated / 1e6;
  row.hit_ratio = delta[1] > 0 ? 1.0 - delta[2] / delta[1] : 0;
  row.stall_ms_per_token = delta[3] * 1e3 / generated;
  row.unread = delta[2] > 0 ? delta[4] / delta[2] : 0;
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  psa::ParseFlags(
      argc, argv,
      "Serving throughput through the KV service with a block pool: dense vs topk vs psa.\n"
      "Usage: psa_serve_bench [--context 8192] [--concurrency 1,8,32] [--tokens 16]");
  const std::string model = absl::GetFlag(FLAGS_model);
  const int context = absl::GetFlag(FLAGS_context) / 16 * 16;  // whole blocks: a stored prefix
  const int tokens = absl::GetFlag(FLAGS_tokens);
  std::vector<int> levels;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',')) {
    int n;
    if (!absl::SimpleAtoi(s, &n) || n < 1) Die(absl::StrCat("bad --concurrency entry '", s, "'"));
    levels.push_back(n);
  }
  std::vector<std::string> policies;  // each policy's text, its name in the table
  std::vector<psa::v1::AttentionPolicy> wires;
  {
    psa::AttentionPolicy base = psa::ClientUnsetPolicy();
    base.top_k = absl::GetFlag(FLAGS_top_k);
    base.epsilon = static_cast<float>(absl::GetFlag(FLAGS_epsilon));
    auto parsed = psa::AttentionPolicy::ParseList(absl::GetFlag(FLAGS_policies), base, &policies);
    if (!parsed.ok()) Die(absl::StrCat("--policies ", parsed.status().message()));
    for (const psa::AttentionPolicy& p : *parsed) {
      auto wire = psa::PolicyToProto(p, base);
      if (!wire.ok()) Die(absl::StrCat("--policies: ", wire.status().message()));
      wires.push_back(*wire);
    }
  }
  const std::string threads = absl::StrCat("--threads=", absl::GetFlag(FLAGS_threads));
  const int max_context = context + 64 + tokens;

  auto kv = Start(PSA_KV_SERVICE_BIN, {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                       "--capacity=8GiB"});
  std::vector<std::string> common = {
      "--model=" + model, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", threads,
      "--kv_shards=" + kv->address(), absl::StrCat("--max_context=", max_context)};
  if (const double bias = absl::GetFlag(FLAGS_resident_bias); bias >= 0) {
    common.push_back(absl::StrCat("--psa_resident_bias=", bias));
  }
  if (const int rows = absl::GetFlag(FLAGS_sparse_prefill_rows); rows >= 0) {
    common.push_back(absl::StrCat("--sparse_prefill_rows=", rows));
  }

  // The document, prefilled and published once.
  std::vector<uint32_t> document;
  std::vector<std::vector<uint32_t>> questions;
  uint64_t kv_bytes_per_token = 0;
  {
    std::vector<std::string> args = common;
    auto worker = Start(PSA_WORKER_BIN, args);
    auto client = Connect(worker->address());
    auto info = client->GetModelInfo();
    if (!info.ok()) Die(std::string(info.status().message()));
    kv_bytes_per_token = 2ull * info->num_layers() * info->num_kv_heads() * info->head_dim() * 2;
    absl::StatusOr<std::string> haystack = psa::ReadHaystack(absl::GetFlag(FLAGS_haystack));
    if (!haystack.ok()) Die(std::string(haystack.status().message()));
    auto ids = client->Tokenize(*haystack);
    if (!ids.ok()) Die(std::string(ids.status().message()));
    if (static_cast<int>(ids->size()) < context) Die("the haystack is shorter than --context");
    document.assign(ids->begin(), ids->begin() + context);
    for (int i = 0; i < 64; ++i) {
      auto q = client->Tokenize(absl::StrCat("\n\nQuestion ", i + 1,
                                             ": what does the essay above say about item ", i * 7,
                                             "? Answer:"));
      if (!q.ok()) Die(std::string(q.status().message()));
      questions.push_back(*q);
    }
    std::fprintf(stderr, "prefilling and publishing the %d-token document...\n", context);
    const absl::Time t0 = absl::Now();
    psa::v1::GenerateRequest r;
    for (uint32_t t : document) r.mutable_token_ids()->add_ids(t);
    r.mutable_token_ids()->add_ids(questions[0][0]);
    r.set_max_tokens(1);
    auto done = client->Generate(r);
    if (!done.ok()) Die(std::string(done.status().message()));
    WaitPublished(*worker);
    std::fprintf(stderr, "  done in %.1f s\n", absl::ToDoubleSeconds(absl::Now() - t0));
    Stop(worker);
  }

  std::vector<Row> rows;
  for (int n : levels) {
    const uint64_t pool = static_cast<uint64_t>(absl::GetFlag(FLAGS_pool_fraction) * n *
                                                (context + 32 + tokens) * kv_bytes_per_token);
    std::vector<std::string> args = common;
    args.push_back(absl::StrCat("--kv_pool=", pool));
    args.push_back(absl::StrCat("--max_running=", n));
    // Whichever policy ran first at a level used to be slower (first token
    // ~2x later, up to 30% fewer tokens/s at 8 sequences, in both orders),
    // most likely because the first run's workers publish each prompt's
    // question blocks, which later runs load instead of prefilling. A
    // discarded one-token run of every sequence first puts all policies in
    // the same position, whatever the cause.
    {
      auto worker = Start(PSA_WORKER_BIN, args);
      std::fprintf(stderr, "%d sequences, warm-up...\n", n);
      RunPolicy(policies.front(), wires.front(), n, *worker, document, questions, /*tokens=*/1);
      WaitPublished(*worker);
      Stop(worker);
    }
    for (size_t pi = 0; pi < policies.size(); ++pi) {
      const std::string& policy = policies[pi];
      // A fresh worker per policy: each starts with an empty pool, not with
      // the pages the policy before it left there.
      auto worker = Start(PSA_WORKER_BIN, args);
      std::fprintf(stderr, "%d sequences, %s (pool %.0f MB)...\n", n, policy.c_str(), pool / 1e6);
      rows.push_back(RunPolicy(policy, wires[pi], n, *worker, document, questions, tokens));
      const Row& r = rows.back();
      std::fprintf(stderr, "  %.2f tok/s, %.1f ms/token, hit ratio %.2f\n", r.tok_per_s,
                   r.ms_per_token, r.hit_ratio);
      Stop(worker);
    }
  }

  std::string table = absl::StrCat(
      "context,sequences,policy,tok_per_s,ms_per_token,ttft_s,kv_read,fetch_mb_per_token,"
      "pool_hit_ratio,stall_ms_per_token,unread_fetch_fraction,same_as_dense,vs_dense,vs_topk\n");
  std::printf("\n%d-token context, pool %.0f%% of the KV, %d tokens per sequence\n", context,
              100 * absl::GetFlag(FLAGS_pool_fraction), tokens);
  std::printf("%5s %-10s %9s %9s %8s %8s %10s %6s %9s %7s %8s %8s %8s\n", "seqs", "policy",
              "tok/s", "ms/tok", "TTFT s", "KV read", "fetch MB/t", "hit", "stall ms", "unread",
              "=dense", "vs dense", "vs topk");
  // Ratios against the level's first dense and first top-k row; "-" (and
  // empty in the CSV) where the run had none.
  auto ratio = [](const Row* base, double x, const char* fmt) -> std::string {
    return base != nullptr ? absl::StrFormat(fmt, x) : "-";
  };
  for (const Row& r : rows) {
    const Row* dense = nullptr;
    const Row* topk = nullptr;
    for (const Row& o : rows) {
      if (o.sequences != r.sequences) continue;
      if (dense == nullptr && o.kind == psa::v1::AttentionPolicy::KIND_DENSE) dense = &o;
      if (topk == nullptr && o.kind == psa::v1::AttentionPolicy::KIND_TOPK) topk = &o;
    }
    const double vs_dense = dense != nullptr ? r.tok_per_s / dense->tok_per_s : 0;
    const double vs_topk = topk != nullptr ? r.tok_per_s / topk->tok_per_s : 0;
    const double same = dense != nullptr ? SameAsDense(r, *dense) : 0;
    std::printf("%5d %-10s %9.2f %9.1f %8.2f %7.1f%% %10.2f %6.2f %9.1f %6.0f%% %8s %8s %8s\n",
                r.sequences, r.policy.c_str(), r.tok_per_s, r.ms_per_token, r.ttft_s,
                100 * r.kv_read, r.fetch_mb_per_token, r.hit_ratio, r.stall_ms_per_token,
                100 * r.unread, ratio(dense, 100 * same, "%.0f%%").c_str(),
                ratio(dense, vs_dense, "%.2fx").c_str(), ratio(topk, vs_topk, "%.2fx").c_str());
    absl::StrAppend(&table, context, ",", r.sequences, ",\"", r.policy, "\",", r.tok_per_s, ",",
                    r.ms_per_token, ",", r.ttft_s, ",", r.kv_read, ",", r.fetch_mb_per_token, ",",
                    r.hit_ratio, ",", r.stall_ms_per_token, ",", r.unread, ",",
                    ratio(dense, same, "%g"), ",", ratio(dense, vs_dense, "%g"), ",",
                    ratio(topk, vs_topk, "%g"), "\n");
  }
  std::printf("(unread: fetched pages the step that asked for them never read; =dense: share of "
              "each sequence's tokens before it first differs from dense's)\n");
  if (const std::string path = absl::GetFlag(FLAGS_csv); !path.empty()) {
    std::ofstream(path) << table;
    std::printf("\nwrote %s\n", path.c_str());
  }
  return 0;
}
