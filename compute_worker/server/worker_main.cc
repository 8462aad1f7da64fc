// psa-worker: a compute worker serving psa.v1.Generation for one GGUF model.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/byte_size.h"
#include "common/flags_main.h"
#include "common/grpc_server_main.h"
#include "common/server_tls_flags.h"
#include "common/tls.h"
#include "common/sha256.h"
#include "compute_worker/model/model_registry.h"
#include "compute_worker/runtime/retrieval_heads.h"
#include "compute_worker/server/attention_metrics.h"
#include "compute_worker/server/generation_service.h"
#include "compute_worker/server/kv_page_fetcher.h"
#include "compute_worker/server/kv_pool_metrics.h"

ABSL_FLAG(std::string, model, "",
          "GGUF model: a file, or a registered name fetched by scripts/fetch_model.sh NAME "
          "(required)");
ABSL_FLAG(std::string, listen, "0.0.0.0:7200", "gRPC address to serve on (port 0: pick one)");
ABSL_FLAG(std::string, kv_tls_ca_file, "",
          "Connect to the KV shards over TLS, trusting this CA (PEM); empty: plaintext unless "
          "--kv_tls_cert_file is set (then the system's roots)");
ABSL_FLAG(std::string, kv_tls_cert_file, "",
          "Mutual TLS to the KV shards: this worker's certificate (PEM); needs --kv_tls_key_file");
ABSL_FLAG(std::string, kv_tls_key_file, "", "The private key of --kv_tls_cert_file (PEM)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9200",
          "IPv4 address:port for Prometheus /metrics (port 0: pick one; empty: off)");
ABSL_FLAG(std::string, port_file, "",
          "If set, write grpc_port=N and metrics_port=M here once serving");
ABSL_FLAG(int, threads, 0, "Compute threads (0: all cores)");
ABSL_FLAG(int, max_context, 0, "Context limit in tokens (0: the model's)");
ABSL_FLAG(int, max_running, 64, "Sequences decoded together in one batch");
ABSL_FLAG(int, max_waiting, 256, "Queued sequences beyond the batch; more are refused");
ABSL_FLAG(int, step_tokens, 512, "Rows per forward step (decode tokens + prompt chunks)");
ABSL_FLAG(int, default_max_tokens, 256, "max_tokens for requests that set none");
ABSL_FLAG(std::string, max_request_bytes, "4MiB",
          "Largest request accepted (e.g. 4MiB): gRPC refuses a larger message with "
          "RESOURCE_EXHAUSTED, and a text or chat prompt may be at most this long. A text "
          "that cannot fit the context by its size alone (more bytes than the context's "
          "tokens times the most bytes one token stands for) is refused before tokenizing");
ABSL_FLAG(std::string, resume_secret_file, "",
          "File holding the secret (16+ bytes) the router signs GenerateRequest.resume with; "
          "give the router the same. Without it every resume is refused (PERMISSION_DENIED), "
          "so the router cannot continue generations here after a worker fails mid-stream");
ABSL_FLAG(int, prompt_threads, 2,
          "Threads that template and tokenize text and chat prompts, apart from gRPC's "
          "threads (which answer health checks); up to --max_running + --max_waiting prompts "
          "wait for them, more are refused with RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, attention, "psa",
          "Attention policy for requests that name none, with the worker's options: dense, "
          "topk or psa, e.g. psa:eps=0.95,min_blocks=16 or topk:k=128 (docs/attention.md); "
          "options it does not name come from the model registry's default for the file, "
          "if it has one, else the built-in defaults");
ABSL_FLAG(std::optional<double>, epsilon, std::nullopt,
          "Shorthand for --attention's eps (psa: attention mass to capture), when given");
ABSL_FLAG(std::optional<int>, top_k_blocks, std::nullopt,
          "Shorthand for --attention's k (topk: blocks per step), when given");
ABSL_FLAG(std::optional<double>, psa_resident_bias, std::nullopt,
          "Shorthand for --attention's rb, when given. With --kv_pool: psa ranks a block it "
          "would have to fetch as if its bound were this much lower (log units of attention "
          "mass), so resident blocks of about equal promise are read first. Opt-in and not "
          "deterministic: outputs then depend on the pool's contents. Default 0: rank by the "
          "bound alone");
ABSL_FLAG(std::optional<int>, sparse_prefill_rows, std::nullopt,
          "A prompt's rows, at most this many in a step, select blocks as topk or psa decode "
          "does (a question after a long stored document reads and fetches what decode would, "
          "not the whole document; fewer bytes and a faster first token, but answers that "
          "leave dense's sooner); longer prompts are attended densely. 0: prefill always dense. "
          "Shorthand for --attention's prefill, when given");
ABSL_FLAG(std::string, retrieval_heads, "registry", psa::kRetrievalHeadsFlagHelp);
ABSL_FLAG(std::string, kv_shards, "",
          "KV service shards (host:port, comma-separated). With them, prompt prefixes are "
          "published to and loaded from the KV service; without, the worker keeps no shared KV");
ABSL_FLAG(std::string, kv_pool, "0",
          "Memory for KV pages (e.g. 2GiB), shared by all sequences, layers and heads; pages "
          "the KV service stores are evicted least-recently-used and fetched again when "
          "attention reads them. Needs --kv_shards. 0: every sequence keeps all its KV in "
          "memory");
ABSL_FLAG(int, kv_fetch_timeout_ms, 10000,
          "With --kv_pool: milliseconds a KV page fetch may take. A sequence whose fetch fails "
          "recomputes its KV from its tokens, at most twice; then it fails with UNAVAILABLE");
ABSL_FLAG(int, prefix_checkpoint_blocks, 32,
          "With --kv_shards: publish prompt prefixes (and generations so far) under their own "
          "names every this many blocks of 16 tokens");
ABSL_FLAG(int, shutdown_grace_ms, 5000,
          "On SIGTERM or SIGINT: milliseconds running generations may take to finish before "
          "they are cancelled");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "psa-worker: %s\n", message.c_str());
  return 2;
}

// How long an OpenMP thread that finished its part of a parallel region
// spins for the next one before it sleeps (libgomp's default, 300000
// spins, lasts milliseconds). The worker's attention tasks wait on KV
// fetches, and threads spinning meanwhile take the cores that the fetches'
// gRPC threads (and a KV service on the same host) need; sleeping at once
// (OMP_WAIT_POLICY=passive) costs a wake-up per region instead, which
// halves single-sequence decode when nothing is fetched. Measured on 2
// cores (bench/README.md, "OpenMP waiting"): the main job 24 / 42-50 / 47-53 tok/s
// passive / 10000 spins / default; through a pool at 1 and 8 sequences
// 18.8 / 15.2 / 10.6 and 27.5 / 25.8 / 18.4 tok/s.
const char* const kOpenMpSpins = "10000";

// libgomp reads its wait settings once, when it loads, so the worker runs
// itself again with GOMP_SPINCOUNT set unless the caller chose a policy.
void ShortenOpenMpSpinning(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) {
    return;
  }
  setenv("GOMP_SPINCOUNT", kOpenMpSpins, 1);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "psa-worker: cannot re-execute with GOMP_SPINCOUNT=%s (%s); "
               "OpenMP threads will spin\n", kOpenMpSpins, std::strerror(errno));
}

}  // namespace

// --attention over `base` (the model's default: the registry's), with the
// shorthand flags given on the command line over it.
static absl::StatusOr<psa::AttentionPolicy> DefaultPolicy(const psa::AttentionPolicy& base) {
  absl::StatusOr<psa::AttentionPolicy> p =
      psa::AttentionPolicy::Parse(absl::GetFlag(FLAGS_attention), base);
  if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat("--attention ", p.status().message()));
  if (auto x = absl::GetFlag(FLAGS_epsilon)) p->epsilon = static_cast<float>(*x);
  if (auto x = absl::GetFlag(FLAGS_top_k_blocks)) p->top_k = *x;
  if (auto x = absl::GetFlag(FLAGS_psa_resident_bias)) p->resident_bias = static_cast<float>(*x);
  if (auto x = absl::GetFlag(FLAGS_sparse_prefill_rows)) p->sparse_prefill_rows = *x;
  return p;
}

int main(int argc, char** argv) {
  ShortenOpenMpSpinning(argv);
  psa::ParseFlags(
      argc, argv,
      "Serves psa.v1.Generation with Progressive Sparse Attention on the CPU.\n"
      "Usage: psa-worker --model=MODEL.gguf [--listen=ADDR:PORT] ...");
  psa::TuneMallocForLargeMessages();
  psa::DisableMutexDeadlockDetection();
  psa::BlockTerminationSignals();

  if (absl::GetFlag(FLAGS_model).empty()) return Fail("--model is required");
  absl::StatusOr<std::string> resolved = psa::ResolveModelPath(absl::GetFlag(FLAGS_model));
  if (!resolved.ok()) return Fail(std::string(resolved.status().message()));
  const std::string model_path = *resolved;
  std::fprintf(stderr, "psa-worker: loading %s\n", model_path.c_str());
  absl::StatusOr<std::string> sha = psa::Sha256File(model_path);
  if (!sha.ok()) return Fail(std::string(sha.status().message()));
  absl::StatusOr<psa::AttentionPolicy> base = psa::DefaultPolicyFor(*sha);
  if (!base.ok()) return Fail(std::string(base.status().message()));
  absl::StatusOr<psa::AttentionPolicy> parsed = DefaultPolicy(*base);
  if (!parsed.ok()) return Fail(std::string(parsed.status().message()));
  const psa::AttentionPolicy policy = *parsed;
  if (absl::Status s = policy.Validate(); !s.ok()) return Fail(std::string(s.message()));
  auto model = psa::LlamaModel::Load(model_path);
  if (!model.ok()) return Fail(absl::StrCat("cannot load the model: ", model.status().message()));

  absl::StatusOr<uint64_t> max_request_bytes =
      psa::ParseByteSize(absl::GetFlag(FLAGS_max_request_bytes));
  if (!max_request_bytes.ok() || *max_request_bytes < 1024 || *max_request_bytes > (1u << 31) - 1) {
    return Fail(absl::StrCat("--max_request_bytes=", absl::GetFlag(FLAGS_max_request_bytes),
                             " must be a size from 1KiB to 2GiB-1 (e.g. 4MiB)"));
  }
  if (absl::GetFlag(FLAGS_prompt_threads) < 1) return Fail("--prompt_threads must be >= 1");
  absl::StatusOr<uint64_t> pool_bytes = psa::ParseByteSize(absl::GetFlag(FLAGS_kv_pool));
  if (!pool_bytes.ok()) return Fail(absl::StrCat("--kv_pool: ", pool_bytes.status().message()));
  const std::string shards = absl::GetFlag(FLAGS_kv_shards);
  if (*pool_bytes > 0 && shards.empty()) {
    return Fail("--kv_pool needs --kv_shards: evicted pages are fetched from the KV service");
  }
  const psa::LlamaHparams& hp = (*model)->hparams();
  psa::metrics::Registry registry;
  std::unique_ptr<psa::KvClient> kv_client;
  if (!shards.empty()) {
    psa::KvClientOptions kv_options;
    kv_options.shards = absl::StrSplit(shards, ',', absl::SkipEmpty());
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> kv_credentials =
        psa::ChannelCredentials({absl::GetFlag(FLAGS_kv_tls_ca_file),
                                 absl::GetFlag(FLAGS_kv_tls_cert_file),
                                 absl::GetFlag(FLAGS_kv_tls_key_file), "--kv_tls_"});
    if (!kv_credentials.ok()) return Fail(std::string(kv_credentials.status().message()));
    kv_options.credentials = *kv_credentials;
    auto client = psa::KvClient::Connect(kv_options);
    if (!client.ok()) return Fail(absl::StrCat("--kv_shards: ", client.status().message()));
    kv_client = std::move(*client);
  }

  // The unified block pool: one page per (layer, KV head, block).
  const size_t page_bytes = 2ull * psa::KvCache::kDefaultBlockSize * hp.head_dim * 2;
  std::unique_ptr<psa::BlockPool> pool;
  std::unique_ptr<psa::KvPageFetcher> fetcher;
  psa::KvPagingCounters paging_counters;
  std::unique_ptr<psa::KvPoolMetrics> pool_metrics;
  psa::RuntimeOptions runtime_options;
  if (*pool_bytes > 0) {
    if (*pool_bytes < 64 * page_bytes) {
      return Fail(absl::StrCat("--kv_pool must hold at least 64 pages of ", page_bytes, " bytes"));
    }
    pool = std::make_unique<psa::BlockPool>(*pool_bytes, page_bytes);
    fetcher = std::make_unique<psa::KvPageFetcher>(
        kv_client.get(), page_bytes, absl::Milliseconds(absl::GetFlag(FLAGS_kv_fetch_timeout_ms)));
    runtime_options.paging = psa::KvPaging{pool.get(), fetcher.get(), &paging_counters};
    pool_metrics = std::make_unique<psa::KvPoolMetrics>(&registry, pool.get(), &paging_counters);
    std::fprintf(stderr, "psa-worker: KV block pool of %llu pages (%s)\n",
                 static_cast<unsigned long long>(pool->capacity_slots()),
                 absl::GetFlag(FLAGS_kv_pool).c_str());
  }
  runtime_options.threads = absl::GetFlag(FLAGS_threads);
  runtime_options.max_context = absl::GetFlag(FLAGS_max_context);
  psa::LlamaRuntime runtime(**model, runtime_options);
  std::string retrieval_settings;  // the marked sites, for the KV service's names
  {
    std::string described;
    absl::StatusOr<std::vector<bool>> sites = psa::ResolveRetrievalHeads(
        absl::GetFlag(FLAGS_retrieval_heads), *sha, hp, &described);
    if (!sites.ok()) return Fail(std::string(sites.status().message()));
    if (absl::Status s = runtime.SetRetrievalHeads(*sites); !s.ok()) return Fail(std::string(s.message()));
    std::fprintf(stderr, "psa-worker: retrieval heads: %s\n", described.c_str());
    if (const std::string names = psa::SiteNames(*sites, hp.n_head_kv); !names.empty()) {
      retrieval_settings = absl::StrCat("retrieval:", names);
    }
  }
  psa::BatchScheduler::Options scheduler_options;
  scheduler_options.max_running = absl::GetFlag(FLAGS_max_running);
  scheduler_options.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  scheduler_options.step_tokens = absl::GetFlag(FLAGS_step_tokens);
  if (scheduler_options.max_running < 1 || scheduler_options.max_waiting < 0 ||
      scheduler_options.step_tokens < 1) {
    return Fail("--max_running and --step_tokens must be >= 1, --max_waiting >= 0");
  }
  std::unique_ptr<psa::PrefixStore> prefix_store;
  if (kv_client != nullptr) {
    psa::v1::KvLayout layout;
    layout.set_model_id(*sha);
    layout.set_num_layers(hp.n_layer);
    layout.set_num_kv_heads(hp.n_head_kv);
    layout.set_head_dim(hp.head_dim);
    layout.set_block_size(psa::KvCache::kDefaultBlockSize);
    layout.set_dtype(psa::v1::KV_DTYPE_F16);
    psa::PrefixStore::Options prefix_options;
    prefix_options.checkpoint_blocks = absl::GetFlag(FLAGS_prefix_checkpoint_blocks);
    if (prefix_options.checkpoint_blocks < 1) return Fail("--prefix_checkpoint_blocks must be >= 1");
    prefix_options.decode_settings = retrieval_settings;
    prefix_store = std::make_unique<psa::PrefixStore>(kv_client.get(), layout, prefix_options,
                                                      &registry);
    psa::PrefixStore* store = prefix_store.get();
    scheduler_options.on_prompt_prefilled = [store](const psa::CacheContents& prompt,
                                                    const psa::KvCache& kv, int) {
      store->Publish(prompt, kv);
    };
    scheduler_options.on_prompt_chunk = [store](const psa::CacheContents& prompt,
                                                const psa::KvCache& kv) {
      store->PublishPrefix(prompt, kv);
    };
    scheduler_options.on_block_filled = [store](const psa::CacheContents& sequence,
                                                const psa::KvCache& kv) {
      store->PublishCheckpoint(sequence, kv);
    };
  }
  psa::AttentionMetrics attention_metrics(&registry, (*model)->hparams().n_layer);
  scheduler_options.on_decode_stats = [&attention_metrics, n_head = (*model)->hparams().n_head](
                                          const std::vector<psa::HeadStepStats>& stats,
                                          const psa::AttentionBackend* attention) {
    attention_metrics.Observe(stats, n_head, attention);
  };
  psa::metrics::Counter& rebuilds =
      registry
          .AddCounter("psa_worker_sequence_rebuilds_total",
                      "Sequences whose KV cache was recomputed from their tokens because the KV "
                      "service could not return blocks they needed")
          .Add();
  scheduler_options.on_rebuild = [&rebuilds] { rebuilds.Increment(); };
  auto scheduler = std::make_unique<psa::BatchScheduler>(&runtime, scheduler_options);
  psa::GenerationServiceOptions service_options;
  service_options.model_id = *sha;
  {  // a registry name as given; a path: its file name without .gguf
    std::string name = absl::GetFlag(FLAGS_model);
    if (name != model_path) {
      service_options.served_name = name;
    } else {
      name = name.substr(name.find_last_of('/') + 1);
      if (absl::EndsWith(name, ".gguf")) name.resize(name.size() - 5);
      service_options.served_name = name;
    }
  }
  service_options.default_attention = policy;
  service_options.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);
  service_options.max_prompt_bytes = *max_request_bytes;
  std::optional<psa::ResumeAuth> resume_auth;
  if (const std::string path = absl::GetFlag(FLAGS_resume_secret_file); !path.empty()) {
    absl::StatusOr<psa::ResumeAuth> auth = psa::ResumeAuth::FromFile(path);
    if (!auth.ok()) return Fail(absl::StrCat("--resume_secret_file: ", auth.status().message()));
    resume_auth.emplace(std::move(*auth));
    service_options.resume_auth = &*resume_auth;
  }
  service_options.prompt_queue.threads = absl::GetFlag(FLAGS_prompt_threads);
  service_options.prompt_queue.max_queued =
      scheduler_options.max_running + scheduler_options.max_waiting;
  service_options.prompt_queue.max_queued_bytes =
      std::max<uint64_t>(*max_request_bytes, 64ull << 20);
  psa::GenerationService service(model->get(), runtime.max_context(), scheduler.get(),
                                 prefix_store.get(), &registry, service_options);

  psa::ServeOptions serve;
  serve.listen = absl::GetFlag(FLAGS_listen);
  serve.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  serve.port_file = absl::GetFlag(FLAGS_port_file);
  serve.max_receive_bytes = *max_request_bytes;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_credentials =
      psa::ServerCredentialsFromFlags();
  if (!server_credentials.ok()) return Fail(std::string(server_credentials.status().message()));
  serve.credentials = *server_credentials;
  auto running = psa::StartServer(serve, &registry, {&service});
  if (!running.ok()) return Fail(std::string(running.status().message()));
  const int grpc_port = running->grpc_port, metrics_port = running->metrics_port;
  std::fprintf(stderr, "psa-worker: %s, serving on port %d (metrics on %d), attention %s\n",
               (*model)->Describe().c_str(), grpc_port, metrics_port, policy.ToString().c_str());

  const int sig = psa::WaitForTerminationSignal();
  std::fprintf(stderr, "psa-worker: signal %d, finishing running generations\n", sig);
  psa::GracefulShutdown(*running, nullptr,
                        absl::Milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  scheduler.reset();
  prefix_store.reset();  // publishes what is queued
  std::fprintf(stderr, "psa-worker: stopped\n");
  return 0;
}
