// psa_accuracy: how closely top-k and PSA attention follow dense attention on
// the real model and real long text, and how much KV each touches.
//
// For each context length C, the first C tokens of the haystack essays (or,
// with --windows, several C-token windows spread over them) are prefilled
// densely; then every policy decodes the next `steps` essay tokens (teacher
// forcing) on its own copy of the cache. Per step it compares the
// policy's next-token distribution with dense's (top-1 agreement, KL) and
// its attention outputs with dense attention recomputed on the same cache
// (relative error). A needle-in-a-haystack probe plants a pass key at several
// depths and asks for it with greedy decoding. The error probe is
// psa_accuracy_probe.h; the figures and their table and CSV files are
// psa_accuracy_results.h.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/flags_main.h"
#include "bench/haystack.h"
#include "bench/psa_accuracy_probe.h"
#include "bench/psa_accuracy_results.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/runtime/llama_runtime.h"
#include "compute_worker/kv/block_pool.h"
#include "compute_worker/kv/cache_page_fetcher.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/runtime/sampler.h"
#include "compute_worker/attention/prefill_attention.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/kernels/matmul.h"
#include "compute_worker/model/model_registry.h"
#include "compute_worker/runtime/retrieval_heads.h"
#include "common/sha256.h"

ABSL_FLAG(std::string, model, "",
          "GGUF model file or registered name (scripts/fetch_model.sh --list) (required).");
ABSL_FLAG(std::string, haystack, "../shared/eval/haystack", "Folder of essay .txt files.");
ABSL_FLAG(std::string, contexts, "2048,4096,8192", "Context lengths.");
ABSL_FLAG(int, steps, 32, "Teacher-forced decode steps per context (and window).");
ABSL_FLAG(int, windows, 1,
          "Windows of text per context length, spread evenly over the haystack: each is "
          "prefilled and decoded for --steps; a policy's figures sum over them. 0: none, "
          "only the needle probe (its rows' other columns are then 0).");
ABSL_FLAG(int, only_window, 0,
          "> 0: run only this window (1-based) of --windows, e.g. to --dump_dir it.");
ABSL_FLAG(std::string, epsilons, "0.8,0.9,0.95,0.98,0.99", "PSA epsilons to sweep.");
ABSL_FLAG(std::string, topk, "8,16,32,64,128", "Top-k block budgets to sweep.");
ABSL_FLAG(int, group_blocks, 4, "PSA blocks per iteration (G).");
ABSL_FLAG(int, min_blocks, psa::AttentionPolicy{}.min_blocks,
          "PSA: blocks every head attends before it may stop (default: the policy's).");
ABSL_FLAG(bool, certified, false, "Also sweep PSA with the certified stop.");
ABSL_FLAG(bool, paper_estimate, false,
          "Also sweep PSA with the paper's AS_min tail estimate (policy suffix ',min').");
ABSL_FLAG(bool, calibrated_estimate, false,
          "Also sweep PSA with the calibrated-bound tail estimate (policy suffix ',cal').");
ABSL_FLAG(bool, mean_estimate, false,
          "Also sweep PSA with the last-iteration-mean tail estimate (policy suffix ',mean').");
ABSL_FLAG(bool, solo, false,
          "Also sweep PSA with share_reads off: a stopped head ignores the blocks its GQA "
          "group reads on for other heads (policy suffix ',solo').");
ABSL_FLAG(bool, oracle, false,
          "Also sweep PSA and top-k with the oracle ranking (blocks by their exact attention "
          "mass, PSA stopping on the exact captured mass): the ceiling of any block selection.");
ABSL_FLAG(bool, normalized_rank, false,
          "Also sweep PSA and top-k ranking blocks by each head's own share of its bounds "
          "(ResearchSelection::normalized_rank, ',norm').");
ABSL_FLAG(std::string, ranks, "",
          "Rankings to sweep every PSA and top-k policy with (AttentionPolicy::rank): "
          "estimate, bound (Quest's), or both: estimate,bound; empty: each kind's default.");
ABSL_FLAG(bool, box_centre_stop, false,
          "Also sweep PSA with the stop weighing blocks by their key box's centre score "
          "instead of their mean key's, as served before 2026-12-07 "
          "(ResearchSelection::box_centre_stop, ',boxstop').");
ABSL_FLAG(std::string, retrieval_heads, "registry", psa::kRetrievalHeadsFlagHelp);
ABSL_FLAG(bool, without_retrieval, false,
          "Also sweep every sparse policy with the retrieval heads selecting as the others "
          "(policy option 'noretrieval').");
ABSL_FLAG(bool, oracle_parts, false,
          "Also sweep PSA with each oracle part alone: the exact ranking with the served stop "
          "(',oracle-rank'), and the bound ranking with the exact stop (',oracle-stop').");
ABSL_FLAG(double, pool_fraction, 0,
          "> 0: decode each policy through a block pool of this fraction of the context's KV, "
          "pages fetched from the dense prefill's cache as from the KV service (as the worker "
          "with --kv_pool does); no output-error probe then.");
ABSL_FLAG(std::string, resident_bias, "",
          "With --pool_fraction: also sweep PSA with these resident_bias values (the "
          "default policy has 2; 0 ranks by the bound alone).");
ABSL_FLAG(std::string, sites_csv, "",
          "Write every policy's attention-output error per (layer, KV head) to this CSV.");
ABSL_FLAG(std::string, split, "all",
          "Essays to read: all, tune (even positions in name order: choose settings "
          "here) or test (odd positions: report here).");
ABSL_FLAG(int, needle_depths, 5, "Needle depths per context (0%..100%); 0 skips the probe.");
ABSL_FLAG(int, threads, 0, "CPU threads (0: all).");
ABSL_FLAG(bool, fast_prefill, true,
          "Prefill with the tiled prefill attention, as served (bit-equal to the "
          "row-at-a-time path, --nofast_prefill, and several times faster).");
ABSL_FLAG(std::string, csv, "", "Write per-(context, policy) results to this CSV file.");
ABSL_FLAG(std::string, steps_csv, "",
          "Write every policy's KL against dense at each decode step to this CSV file.");
ABSL_FLAG(std::string, layers_csv, "", "Write PSA's per-layer KV fraction to this CSV file.");
ABSL_FLAG(std::string, dump_dir, "",
          "Research: write the dense trajectory's decode queries (queries.bin: per task int32 "
          "context, layer, kv_head, n_keys, then group x head_dim float32) and the keys "
          "(keys_C.bin: fp16 [layer][kv_head][position][head_dim]) to this folder, to study "
          "block rankings offline (bench/rank_study.py).");

namespace psa {
namespace {

std::vector<std::string> SplitList(const std::string& s) {
  return absl::StrSplit(s, ',', absl::SkipEmpty());
}

[[noreturn]] void Die(const std::string& msg) {
  std::cerr << "error: " << msg << "\n";
  std::exit(1);
}

// The dense trajectory's decode queries, appended to a file (--dump_dir).
class QueryRecorder : public AttentionBackend {
 public:
  QueryRecorder(std::FILE* f, int context) : f_(f), context_(context) {}
  std::string_view name() const override { return "dense"; }
  void Run(const AttentionShape& shape, const AttentionTask& task) const override {
    dense_.Run(shape, task);
    if (task.n_q != 1 || task.prefill) return;
    const int32_t head[4] = {context_, task.layer, task.kv_head, task.q_pos0 + 1};
    std::lock_guard<std::mutex> lock(mu_);
    std::fwrite(head, sizeof(head), 1, f_);
    for (int g = 0; g < shape.group(); ++g) {
      std::fwrite(task.q + g * shape.head_dim, sizeof(float), shape.head_dim, f_);
    }
  }

 private:
  std::FILE* f_;
  int context_;
  DenseAttention dense_;
  mutable std::mutex mu_;
};

void DumpKeys(const KvCache& kv, int rows, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) Die("cannot write " + path);
  for (int l = 0; l < kv.n_layer(); ++l) {
    for (int h = 0; h < kv.n_head_kv(); ++h) {
      const KvRows keys = kv.Keys(l, h);
      for (int t = 0; t < rows; ++t) std::fwrite(keys.row(t), sizeof(uint16_t), kv.head_dim(), f);
    }
  }
  std::fclose(f);
}

std::string Haystack() {
  absl::StatusOr<HaystackSplit> split = ParseHaystackSplit(absl::GetFlag(FLAGS_split));
  if (!split.ok()) Die(std::string(split.status().message()));
  absl::StatusOr<std::string> text = ReadHaystack(absl::GetFlag(FLAGS_haystack), *split);
  if (!text.ok()) Die(std::string(text.status().message()));
  return *text;
}

}  // namespace
}  // namespace psa

int main(int argc, char** argv) {
  using namespace psa;
  psa::ParseFlags(
      argc, argv,
      "Compares PSA and top-k attention with dense on the real model and long text.\n"
      "  psa_accuracy --model M.gguf [--contexts 2048,4096,8192] [--csv out.csv]");
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) Die("--model is required");
  SetTiledPrefillAttentionEnabled(absl::GetFlag(FLAGS_fast_prefill));
  auto model_or = LlamaModel::Load(path);
  if (!model_or.ok()) Die(std::string(model_or.status().message()));
  const LlamaModel& model = **model_or;
  const Tokenizer& tok = model.tokenizer();
  const int V = model.hparams().n_vocab, n_head = model.hparams().n_head;
  std::vector<int> contexts;
  for (const std::string& c : SplitList(absl::GetFlag(FLAGS_contexts))) {
    int v;
    if (!absl::SimpleAtoi(c, &v) || v < 64) Die("bad --contexts entry " + c);
    contexts.push_back(v);
  }
  const int steps = absl::GetFlag(FLAGS_steps);
  const int windows = absl::GetFlag(FLAGS_windows);
  if (steps < 1 || windows < 0) Die("--steps must be >= 1 and --windows >= 0");
  if (windows == 0 && absl::GetFlag(FLAGS_needle_depths) == 0) {
    Die("--windows 0 runs only the needle probe: give --needle_depths");
  }
  const int only_window = absl::GetFlag(FLAGS_only_window);
  if (only_window < 0 || only_window > windows) Die("--only_window must be in [0, --windows]");
  const double pool_fraction = absl::GetFlag(FLAGS_pool_fraction);
  if (!(pool_fraction >= 0 && pool_fraction <= 1)) Die("--pool_fraction must be in [0, 1]");
  RuntimeOptions opts;
  opts.threads = absl::GetFlag(FLAGS_threads);
  // A context of exactly the training length still gets its decode steps
  // (and the needle answers), a few positions past it.
  opts.max_context = model.hparams().n_ctx_train;
  for (int c : contexts) opts.max_context = std::max(opts.max_context, c + std::max(steps, 10));
  LlamaRuntime rt(model, opts);
  {
    absl::StatusOr<std::string> file = ResolveModelPath(path);
    absl::StatusOr<std::string> sha = file.ok() ? Sha256File(*file) : file.status();
    if (!sha.ok()) Die(std::string(sha.status().message()));
    std::string described;
    absl::StatusOr<std::vector<bool>> mask = ResolveRetrievalHeads(
        absl::GetFlag(FLAGS_retrieval_heads), *sha, model.hparams(), &described);
    if (!mask.ok()) Die(std::string(mask.status().message()));
    if (auto s = rt.SetRetrievalHeads(*mask); !s.ok()) Die(std::string(s.message()));
    std::cerr << "retrieval heads: " << described << "\n";
  }

  // The policies under test, each with its research variant (served: none);
  // dense is the reference.
  std::vector<std::pair<AttentionPolicy, ResearchSelection>> policies;
  using Tail = ResearchSelection::Tail;
  auto with_tail = [](Tail t) {
    ResearchSelection r;
    r.tail = t;
    return r;
  };
  auto normalized = [] {
    ResearchSelection r;
    r.normalized_rank = true;
    return r;
  };
  auto with_oracle = [](bool rank, bool stop) {
    ResearchSelection r;
    r.oracle_rank = rank;
    r.oracle_stop = stop;
    return r;
  };
  for (const std::string& e : SplitList(absl::GetFlag(FLAGS_epsilons))) {
    AttentionPolicy p;
    p.kind = AttentionPolicy::Kind::kPsa;
    if (!absl::SimpleAtof(e, &p.epsilon)) Die("bad --epsilons entry " + e);
    p.group_blocks = absl::GetFlag(FLAGS_group_blocks);
    p.min_blocks = absl::GetFlag(FLAGS_min_blocks);
    policies.push_back({p, {}});
    for (const std::string& b : SplitList(absl::GetFlag(FLAGS_resident_bias))) {
      AttentionPolicy m = p;
      if (!absl::SimpleAtof(b, &m.resident_bias)) Die("bad --resident_bias entry " + b);
      if (m.resident_bias != p.resident_bias) policies.push_back({m, {}});
    }
    if (absl::GetFlag(FLAGS_calibrated_estimate)) {
      policies.push_back({p, with_tail(Tail::kCalibratedBound)});
    }
    if (absl::GetFlag(FLAGS_solo)) {
      AttentionPolicy m = p;
      m.share_reads = false;
      policies.push_back({m, {}});
    }
    if (absl::GetFlag(FLAGS_mean_estimate)) policies.push_back({p, with_tail(Tail::kLastGroupMean)});
    if (absl::GetFlag(FLAGS_box_centre_stop)) {
      ResearchSelection r;
      r.box_centre_stop = true;
      policies.push_back({p, r});
    }
    if (absl::GetFlag(FLAGS_paper_estimate)) policies.push_back({p, with_tail(Tail::kMinSeen)});
    if (absl::GetFlag(FLAGS_oracle)) policies.push_back({p, with_oracle(true, true)});
    if (absl::GetFlag(FLAGS_normalized_rank)) policies.push_back({p, normalized()});
    if (absl::GetFlag(FLAGS_oracle_parts)) {
      for (bool rank : {true, false}) policies.push_back({p, with_oracle(rank, !rank)});
    }
    if (absl::GetFlag(FLAGS_certified)) {
      p.certified = true;
      policies.push_back({p, {}});
    }
  }
  for (const std::string& k : SplitList(absl::GetFlag(FLAGS_topk))) {
    AttentionPolicy p;
    p.kind = AttentionPolicy::Kind::kTopK;
    if (!absl::SimpleAtoi(k, &p.top_k)) Die("bad --topk entry " + k);
    policies.push_back({p, {}});
    if (absl::GetFlag(FLAGS_oracle)) policies.push_back({p, with_oracle(true, false)});
    if (absl::GetFlag(FLAGS_normalized_rank)) policies.push_back({p, normalized()});
  }
  // Every policy in each ranking asked for (those a research ranking
  // overrides once).
  std::vector<AttentionPolicy::Rank> ranks;
  if (absl::GetFlag(FLAGS_ranks).empty()) ranks.push_back(AttentionPolicy{}.rank);
  for (const std::string& r : SplitList(absl::GetFlag(FLAGS_ranks))) {
    absl::StatusOr<AttentionPolicy::Rank> rank = AttentionPolicy::ParseRank(r);
    if (!rank.ok()) Die("--ranks: " + std::string(rank.status().message()));
    ranks.push_back(*rank);
  }
  if (ranks.empty()) Die("--ranks needs at least one ranking");
  {
    std::vector<std::pair<AttentionPolicy, ResearchSelection>> all;
    for (const auto& [p, research] : policies) {
      for (AttentionPolicy::Rank rank : ranks) {
        AttentionPolicy q = p;
        q.rank = rank;
        all.push_back({q, research});
        if (research.oracle_rank || research.normalized_rank) break;
      }
    }
    policies = std::move(all);
  }
  if (absl::GetFlag(FLAGS_without_retrieval)) {
    std::vector<std::pair<AttentionPolicy, ResearchSelection>> all;
    for (const auto& [p, research] : policies) {
      all.push_back({p, research});
      if (p.kind == AttentionPolicy::Kind::kDense || research.oracle_rank) continue;
      AttentionPolicy q = p;
      q.retrieval_dense = false;
      all.push_back({q, research});
    }
    policies = std::move(all);
  }
  std::vector<std::unique_ptr<ProbedAttention>> backends;
  for (const auto& [p, research] : policies) {
    if (auto s = p.Validate(); !s.ok()) Die(std::string(s.message()));
    backends.push_back(std::make_unique<ProbedAttention>(
        std::make_unique<SparseAttention>(p, research)));
  }

  // --dump_dir: one file of queries for the run, one of keys per context.
  const std::string dump = absl::GetFlag(FLAGS_dump_dir);
  if (!dump.empty()) {
    if (windows > 1 && only_window == 0) {
      Die("--dump_dir takes one window (the keys file is per context): --only_window");
    }
    std::FILE* f = std::fopen((dump + "/queries.bin").c_str(), "wb");
    if (f == nullptr) Die("cannot write to --dump_dir " + dump);
    std::fclose(f);
  }
  const std::vector<TokenId> essay = tok.Encode(Haystack(), false, false);
  std::vector<PolicyResult> results;
  using Clock = std::chrono::steady_clock;

  for (int C : contexts) {
    if (C + steps > static_cast<int>(essay.size()) || C + steps > rt.max_context()) {
      std::cerr << "skip context " << C << ": not enough text or over the model's context\n";
      continue;
    }
    // This context's rows: one per policy, summed over the windows.
    const size_t first_row = results.size();
    for (size_t pi = 0; pi < policies.size(); ++pi) {
      PolicyResult r;
      r.policy = VariantName(policies[pi].first, policies[pi].second);
      r.context = C;
      results.push_back(std::move(r));
      backends[pi]->Reset();
    }
    for (int w = 0; w < windows; ++w) {
      if (only_window > 0 && w != only_window - 1) continue;
      // Window w starts at an even share of the text the windows can use.
      const size_t begin = windows == 1 ? 0 : (essay.size() - C - steps) * w / (windows - 1);
      const TokenId* text = essay.data() + begin;
      std::vector<float> logits;
      KvCache base = rt.NewCache();
      const auto t0 = Clock::now();
      if (auto s = rt.Prefill(&base, {text, static_cast<size_t>(C)}, &logits); !s.ok()) {
        Die(std::string(s.message()));
      }
      std::cerr << "context " << C << ", window " << w + 1 << "/" << windows << " (token " << begin
                << "): prefill " << std::chrono::duration<double>(Clock::now() - t0).count()
                << " s\n";

      // Dense trajectory.
      std::vector<std::vector<float>> dense_logits;
      {
        KvCache kv = base;
        std::vector<float> lg = logits;
        std::FILE* qf = nullptr;
        if (!dump.empty()) {
          qf = std::fopen((dump + "/queries.bin").c_str(), "ab");
          if (qf == nullptr) Die("cannot write to --dump_dir " + dump);
        }
        QueryRecorder recorder(qf, C);
        for (int s = 0; s < steps; ++s) {
          const TokenId t = text[C + s];
          if (qf != nullptr) {
            BatchEntry e{&kv, {&t, 1}, true, &recorder, nullptr};
            if (auto st = rt.Forward({&e, 1}, &lg); !st.ok()) Die(std::string(st.message()));
          } else if (auto st = rt.Prefill(&kv, {&t, 1}, &lg); !st.ok()) {
            Die(std::string(st.message()));
          }
          dense_logits.push_back(lg);
        }
        if (qf != nullptr) {
          std::fclose(qf);
          DumpKeys(kv, C + steps, absl::StrCat(dump, "/keys_", C, ".bin"));
        }
      }
      for (size_t pi = 0; pi < policies.size(); ++pi) {
        PolicyResult& r = results[first_row + pi];
        // Through a pool (--pool_fraction) or on a private copy.
        std::unique_ptr<BlockPool> pool;
        KvPagingCounters counters;
        CachePageFetcher fetcher(base);
        if (pool_fraction > 0) {
          pool = std::make_unique<BlockPool>(
              static_cast<uint64_t>(pool_fraction * base.n_layer() * base.n_head_kv() *
                                    base.full_blocks() * base.page_bytes()),
              base.page_bytes());
        }
        KvCache kv = pool ? PooledCopy(base, KvPaging{pool.get(), &fetcher, &counters}) : base;
        std::vector<HeadStepStats> stats;
        std::vector<float> lg;
        for (int s = 0; s < steps; ++s) {
          const TokenId t = text[C + s];
          BatchEntry e{&kv, {&t, 1}, true, backends[pi].get(), &stats};
          if (auto st = rt.Forward({&e, 1}, &lg); !st.ok()) Die(std::string(st.message()));
          Accumulate(stats, n_head, model.hparams().n_head / model.hparams().n_head_kv, &r);
          const auto& ref = dense_logits[s];
          r.agree += ArgMax(lg.data(), V) == ArgMax(ref.data(), V);
          r.step_kl.push_back(Kl(Softmax(ref.data(), V), Softmax(lg.data(), V)));
          r.kl_sum += r.step_kl.back();
          ++r.steps;
        }
        r.fetched += counters.page_fetches;
        r.rel_err = backends[pi]->MeanRelativeError();
        r.sites.clear();  // the windows so far
        const auto& sites = backends[pi]->sites();
        for (size_t l = 0; l < sites.size(); ++l) {
          for (size_t h = 0; h < sites[l].size(); ++h) {
            const ProbedAttention::SiteError& e = sites[l][h];
            if (e.tasks == 0) continue;
            r.sites.push_back({static_cast<int>(l), static_cast<int>(h), e.sum / e.tasks, e.max,
                               static_cast<double>(e.large) / e.tasks});
          }
        }
        std::cerr << absl::StrFormat(
            "  %-24s top1 %.3f  KL %.5f  relerr %.4f  KV %.3f  read %.3f  fetched %.3f%s\n",
            r.policy, r.Agreement(), r.kl_sum / r.steps, r.rel_err, r.KvFraction(),
            r.ReadFraction(), r.FetchFraction(), windows > 1 ? " (windows so far)" : "");
      }
    }

    // Needle in a haystack: pass key at several depths, asked in ChatML.
    const int depths = absl::GetFlag(FLAGS_needle_depths);
    if (depths > 0) {
      PolicyResult d;
      d.policy = "dense";
      d.context = C;
      d.steps = d.agree = steps;
      d.touched = d.total = 1;
      results.push_back(d);
    }
    // Every depth's prompt starts with the same text (head, then the essay up
    // to the needle), and the depths go deeper in order: that shared prefix is
    // prefilled once, a chunk per depth, and each depth prefills only its
    // needle and the rest (the same prompt, prefilled in two pieces as a
    // chunked prefill would). Ten depths at 32K took 0.74 of ten whole
    // prefills: attention, quadratic, is most of a long prefill.
    const std::vector<TokenId> head = tok.Encode("<|im_start|>user\n", false, true);
    const std::vector<TokenId> tail = tok.Encode(
        "\n\nWhat is the pass key? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n",
        false, true);
    KvCache shared = rt.NewCache();
    int shared_at = -1;  // essay tokens in `shared` after the head; -1: empty
    for (int di = 0; di < depths; ++di) {
      const double depth = depths == 1 ? 0.5 : static_cast<double>(di) / (depths - 1);
      const std::string key = std::to_string(10000 + (C * 7 + di * 7919) % 89999);
      const std::vector<TokenId> needle =
          tok.Encode(absl::StrCat(" The pass key is ", key, ". Remember it. "), false, false);
      const int fill = C - static_cast<int>(head.size() + needle.size() + tail.size());
      const int at = static_cast<int>(depth * fill);
      const auto t0 = Clock::now();
      if (at < shared_at) {  // a longer key moved the needle back: start again
        shared = rt.NewCache();
        shared_at = -1;
      }
      std::vector<TokenId> chunk;
      if (shared_at < 0) {
        chunk = head;
        shared_at = 0;
      }
      chunk.insert(chunk.end(), essay.begin() + shared_at, essay.begin() + at);
      std::vector<float> first;
      if (!chunk.empty()) {
        if (auto s = rt.Prefill(&shared, chunk, &first); !s.ok()) Die(std::string(s.message()));
      }
      shared_at = at;
      std::vector<TokenId> rest = needle;
      rest.insert(rest.end(), essay.begin() + at, essay.begin() + fill);
      rest.insert(rest.end(), tail.begin(), tail.end());
      KvCache nbase = shared;
      if (auto s = rt.Prefill(&nbase, rest, &first); !s.ok()) Die(std::string(s.message()));
      auto answer = [&](const AttentionBackend* backend) {
        KvCache kv = nbase;
        std::vector<float> lg = first;
        std::vector<TokenId> out;
        for (int i = 0; i < 10; ++i) {
          const TokenId t = ArgMax(lg.data(), V);
          if (tok.IsEndOfGeneration(t)) break;
          out.push_back(t);
          BatchEntry e{&kv, {&t, 1}, true, backend, nullptr};
          if (auto s = rt.Forward({&e, 1}, &lg); !s.ok()) Die(std::string(s.message()));
        }
        return tok.Decode(out);
      };
      const std::string dense_answer = answer(&rt.default_attention());
      std::cerr << absl::StrFormat("  needle C=%d depth %.0f%%: dense says '%s' (%s)", C,
                                   depth * 100, dense_answer,
                                   dense_answer.find(key) != std::string::npos ? "found" : "missed");
      for (size_t pi = 0; pi < policies.size(); ++pi) {
        PolicyResult& r = results[first_row + pi];
        r.needles += 1;
        const bool found = answer(backends[pi].get()).find(key) != std::string::npos;
        r.needles_found += found;
        std::cerr << (pi == 0 ? "; " : ", ") << r.policy << (found ? " found" : " missed");
      }
      std::cerr << absl::StrFormat(" (%.0f s)\n",
                                   std::chrono::duration<double>(Clock::now() - t0).count());
      PolicyResult* dense_row = &results.back();
      dense_row->needles += 1;
      dense_row->needles_found += dense_answer.find(key) != std::string::npos;
    }
  }

  PrintResults(results, n_head);
  if (const std::string csv = absl::GetFlag(FLAGS_csv); !csv.empty()) {
    WriteResultsCsv(csv, results);
  }
  if (const std::string scsv = absl::GetFlag(FLAGS_sites_csv); !scsv.empty()) {
    WriteSitesCsv(scsv, results);
  }
  if (const std::string tcsv = absl::GetFlag(FLAGS_steps_csv); !tcsv.empty()) {
    WriteStepsCsv(tcsv, results);
  }
  if (const std::string lcsv = absl::GetFlag(FLAGS_layers_csv); !lcsv.empty()) {
    WriteLayersCsv(lcsv, results);
  }
  return 0;
}
