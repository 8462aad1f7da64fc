#include "compute_worker/attention/sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/kv/kv_page_reader.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace psa {
namespace {

// Online-softmax state of one query head.
struct HeadState {
  float m = -INFINITY;          // running max of scores
  double l = 0;                 // exp-sum in the running scale (AS_acc)
  double as_min = INFINITY;     // smallest full-block exp-sum, running scale
  double group_sum = 0;         // exp-sum of the latest iteration's blocks, running scale
  int group_n = 0;              // blocks in the latest iteration
  double seen_sum = 0;          // exp-sum of every candidate block attended, running scale
  double group_w = 0;           // stop weights (see below) of the latest iteration's blocks
  double seen_w = 0;            // ... of every candidate block attended
  std::vector<float> acc;       // sum of exp(s - m) * v
  bool active = true;            // computes on the blocks read
  bool deciding = true;          // has not stopped: its budget still grows
  int blocks = 0;
  int iterations = 0;
  float captured = 1.0f;
};

// Research ceiling (AttentionPolicy::oracle_rank / oracle_stop): each candidate block's exact
// log-mass log(sum_t exp(s_t)) per head, from every key, in place of its
// upper bound; same outputs as BlockBounds::Score.
void ExactBlockScores(const KvCache& kv, int layer, int kv_head, int first_block, int n_cand,
                      const float* const* qs, int group, int d, float scale, float* ub,
                      float* gscore) {
  const KvRows keys = kv.Keys(layer, kv_head);
  const int B = kv.block_size();
  std::vector<float> krow(d), s(B);
  for (int c = 0; c < n_cand; ++c) {
    const int t0 = (first_block + c) * B;
    gscore[c] = -INFINITY;
    for (int g = 0; g < group; ++g) {
      float m = -INFINITY;
      for (int t = 0; t < B; ++t) {
        Fp16RowToFp32(keys.row(t0 + t), krow.data(), d);
        m = std::max(m, s[t] = DotF32(qs[g], krow.data(), d) * scale);
      }
      const float lse = m + static_cast<float>(std::log(ExpShiftSum(s.data(), B, m)));
      ub[static_cast<size_t>(g) * n_cand + c] = lse;
      gscore[c] = std::max(gscore[c], lse);
    }
  }
}

#if defined(__AVX512F__)
// The 16 rows of a full block, head dim 64, for the group's active heads:
// s[g * stride + t] = scale * q_g . k_t.
template <int kGroup>
void BlockScores16x64(const uint16_t* k, const float* const* qs, float scale, float* s, int stride) {
  __m512 dots[kGroup];
  Dot16RowsFp16x64<kGroup>(qs, k, dots);
  for (int g = 0; g < kGroup; ++g) {
    _mm512_storeu_ps(s + static_cast<size_t>(g) * stride, _mm512_mul_ps(dots[g], _mm512_set1_ps(scale)));
  }
}

// Usually every head of the group is active (a stopped head attends on
// with share_reads): the block kernels then convert each row once, in
// registers, for all of them.
bool AllActive(const HeadState* heads, int group) {
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) return false;
  }
  return true;
}

void BlockScores16x64(const uint16_t* k, const float* const* qs, const HeadState* heads,
                      int group, float scale, float* s, int stride) {
  if (AllActive(heads, group) && WithGroup(group, [&](auto g) {
        BlockScores16x64<decltype(g)::value>(k, qs, scale, s, stride);
      })) {
    return;
  }
  alignas(64) float kf[16 * 64];
  Fp16RowToFp32(k, kf, 16 * 64);
  for (int g = 0; g < group; ++g) {
    if (!heads[g].active) continue;
    _mm512_storeu_ps(s + static_cast<size_t>(g) * stride,
                     _mm512_mul_ps(Dot16Rows64(qs[g], kf), _mm512_set1_ps(scale)));
  }
}

// acc_g += sum_t p[g * stride + t] * v_t over the 16 rows of a full block,
// head dim 64, for the group's active heads.
template <int kGroup>
void BlockValues16x64(const uint16_t* v, const float* p, int stride, HeadState* heads) {
  __m512 a[kGroup][4];
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < 4; ++j) a[g][j] = _mm512_loadu_ps(heads[g].acc.data() + 16 * j);
  for (int t = 0; t < 16; ++t, v += 64) {
    __m512 vv[4];
    Fp16Row64(v, vv);
    AccumulateRow64<kGroup>(p + t, stride, vv, a);
  }
  for (int g = 0; g < kGroup; ++g)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(heads[g].acc.data() + 16 * j, a[g][j]);
}

void BlockValues16x64(const uint16_t* v, const float* p, int stride, HeadState* heads,
                      int group) {
  if (AllActive(heads, group) && WithGroup(group, [&](auto g) {
        BlockValues16x64<decltype(g)::value>(v, p, stride, heads);
      })) {
    return;
  }
  alignas(64) float vf[16 * 64];
  Fp16RowToFp32(v, vf, 16 * 64);
  for (int g = 0; g < group; ++g) {
    HeadState& h = heads[g];
    if (!h.active) continue;
    __m512 a[4];
    for (int j = 0; j < 4; ++j) a[j] = _mm512_loadu_ps(h.acc.data() + 16 * j);
    for (int t = 0; t < 16; ++t) {
      const __m512 pt = _mm512_set1_ps(p[static_cast<size_t>(g) * stride + t]);
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(pt, _mm512_load_ps(vf + t * 64 + 16 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(h.acc.data() + 16 * j, a[j]);
  }
}
constexpr bool kBlockKernels = true;
#else
constexpr bool kBlockKernels = false;  // the stubs below are never called
void BlockScores16x64(const uint16_t*, const float* const*, const HeadState*, int, float, float*,
                      int) {}
void BlockValues16x64(const uint16_t*, const float*, int, HeadState*, int) {}
#endif

// Where one query row's blocks fall: the sinks [0, sink), the candidates
// the policy chooses among [sink, local_begin), and the newest blocks
// [local_begin, n_blocks), the partial tail included; sinks and newest are
// always attended.
struct BlockLayout {
  int n_blocks, sink, local_begin;
  int n_cand() const { return local_begin - sink; }
  int forced() const { return sink + (n_blocks - local_begin); }
  void AppendForced(std::vector<int>* blocks) const {
    for (int b = 0; b < sink; ++b) blocks->push_back(b);
    for (int b = local_begin; b < n_blocks; ++b) blocks->push_back(b);
  }
};

// The layout for a row that sees positions [0, n_keys) of kv.
BlockLayout LayoutOf(const KvCache& kv, int n_keys, const AttentionPolicy& p) {
  const int B = kv.block_size();
  // Blocks with metadata: committed and entirely inside the visible range.
  const int n_meta = std::min(kv.full_blocks(), n_keys / B);
  const int sink = std::min(p.sink_blocks, n_meta);
  return BlockLayout{(n_keys + B - 1) / B, sink, std::max(sink, n_meta - p.local_blocks)};
}

// Candidates a paged step asks for before its first iteration: top-k's
// whole budget; PSA's budget floor, one iteration, or the budget of its
// previous step (`hint`: budgets change little between steps), the most.
int UpfrontCandidates(const AttentionPolicy& p, const BlockLayout& lay, int hint) {
  const int forced = lay.forced();
  const int n = p.kind == AttentionPolicy::Kind::kTopK
                    ? p.top_k - forced
                    : std::max({p.group_blocks, p.min_blocks - forced, hint - forced});
  return std::clamp(n, 0, lay.n_cand());
}

// PSA through a pool: a candidate the reader would have to fetch ranks as
// if its bound were resident_bias lower (gscore[c] -= resident_bias).
void BiasNonResident(const AttentionPolicy& p, const KvPageReader& reader, const BlockLayout& lay,
                     float* gscore) {
  const int n_cand = lay.n_cand();
  if (p.kind != AttentionPolicy::Kind::kPsa || p.resident_bias <= 0 || n_cand == 0) return;
  thread_local std::vector<uint8_t> resident;
  resident.resize(n_cand);
  reader.Resident(lay.sink, n_cand, resident.data());
  for (int c = 0; c < n_cand; ++c) {
    if (!resident[c]) gscore[c] -= p.resident_bias;
  }
}

}  // namespace

absl::Status AttentionPolicy::Validate() const {
  if (kind == Kind::kPsa) {
    if (!(epsilon > 0.0f && epsilon <= 1.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("epsilon must be in (0, 1], got ", epsilon));
    }
    if (group_blocks < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("group_blocks must be >= 1, got ", group_blocks));
    }
  }
  if (kind == Kind::kPsa && !(resident_bias >= 0.0f && resident_bias <= 100.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("resident_bias must be in [0, 100], got ", resident_bias));
  }
  if (kind == Kind::kTopK && top_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 1, got ", top_k));
  }
  if (sparse_prefill_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse_prefill_rows must be >= 0, got ", sparse_prefill_rows));
  }
  if (min_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("min_blocks must be >= 0, got ", min_blocks));
  }
  if (sink_blocks < 0 || local_blocks < 0) {
    return absl::InvalidArgumentError("sink_blocks and local_blocks must be >= 0");
  }
  return absl::OkStatus();
}

std::string AttentionPolicy::ToString() const {
  switch (kind) {
    case Kind::kDense: return "dense";
    case Kind::kTopK:
      return absl::StrCat("topk(k=", top_k, oracle_rank ? ",oracle" : "",
                          sparse_prefill_rows > 0 ? absl::StrCat(",prefill=", sparse_prefill_rows) : "",
                          ")");
    case Kind::kPsa:
      return absl::StrCat("psa(eps=", epsilon, ",G=", group_blocks,
                          min_blocks > 0 ? absl::StrCat(",min_blocks=", min_blocks) : "",
                          oracle_rank && oracle_stop             ? ",oracle"
                          : oracle_rank                          ? ",oracle-rank"
                          : oracle_stop                          ? ",oracle-stop"
                          : certified                            ? ",certified"
                          : tail == TailEstimate::kMinSeen        ? ",min"
                          : tail == TailEstimate::kCalibratedBound ? ",cal"
                          : tail == TailEstimate::kLastGroupMean  ? ",mean"
                                                                  : "",
                          share_reads ? "" : ",solo",
                          resident_bias != AttentionPolicy{}.resident_bias
                              ? absl::StrCat(",rb=", resident_bias)
                              : "",
                          sparse_prefill_rows > 0 ? absl::StrCat(",prefill=", sparse_prefill_rows) : "",
                          ")");
  }
  return "?";
}

std::unique_ptr<AttentionBackend> MakeAttention(const AttentionPolicy& policy) {
  if (policy.kind == AttentionPolicy::Kind::kDense) return std::make_unique<DenseAttention>();
  return std::make_unique<SparseAttention>(policy);
}

std::string_view SparseAttention::name() const {
  return policy_.kind == AttentionPolicy::Kind::kTopK ? "topk" : "psa";
}

void SparseAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  if (task.entry_rows > 1) {  // prefill
    // Rows whose selection would read every block anyway go dense too
    // (its many-row kernel is faster): a short context.
    const int B = task.kv->block_size();
    const int blocks = (task.q_pos0 + task.n_q + B - 1) / B;
    const int floor = policy_.sink_blocks + policy_.local_blocks + 1 +
                      (policy_.kind == AttentionPolicy::Kind::kTopK ? policy_.top_k
                                                                    : policy_.min_blocks);
    if (task.entry_rows > policy_.sparse_prefill_rows || blocks <= floor) {
      dense_.Run(shape, task);
      return;
    }
  }
  for (int row = 0; row < task.n_q; ++row) {
    RunQuery(shape, task, row, task.stats != nullptr && row == task.n_q - 1);
  }
}

std::unique_ptr<KvPageReader> SparseAttention::StartFetches(const AttentionShape& shape,
                                                            const AttentionTask& task) const {
  const KvCache& kv = *task.kv;
  if (!kv.paged() || task.entry_rows != 1 || task.n_q != 1) return nullptr;
  const int group = shape.group();
  const BlockLayout lay = LayoutOf(kv, task.q_pos0 + 1, policy_);
  const int n_cand = lay.n_cand();
  const int want = UpfrontCandidates(policy_, lay, kv.ReadHint(task.layer, task.kv_head));
  auto reader = std::make_unique<KvPageReader>(kv, task.layer, task.kv_head);
  thread_local std::vector<int> blocks;
  blocks.clear();
  lay.AppendForced(&blocks);
  if (want > 0) {
    const float* qs[kMaxGqaGroup];
    for (int g = 0; g < group; ++g) qs[g] = task.q + g * shape.head_dim;
    thread_local std::vector<float> gscore;
    thread_local std::vector<int> order;
    gscore.resize(n_cand);
    kv.KeyBounds(task.layer, task.kv_head)
        .Score(qs, group, shape.scale, lay.sink, lay.local_begin, nullptr, n_cand, gscore.data());
    BiasNonResident(policy_, *reader, lay, gscore.data());
    order.resize(n_cand);
    for (int c = 0; c < n_cand; ++c) order[c] = c;
    std::nth_element(order.begin(), order.begin() + (want - 1), order.end(),
                     [&](int a, int b) { return gscore[a] > gscore[b]; });
    for (int k = 0; k < want; ++k) blocks.push_back(lay.sink + order[k]);
  }
  reader->Prefetch(blocks);
  return reader;
}

void SparseAttention::RunQuery(const AttentionShape& shape, const AttentionTask& task, int row,
                               bool record) const {
  const KvCache& kv = *task.kv;
  const int d = shape.head_dim, group = shape.group(), B = kv.block_size();
  const int n_keys = task.q_pos0 + row + 1;
  const BlockLayout lay = LayoutOf(kv, n_keys, policy_);
  const int n_blocks = lay.n_blocks, sink = lay.sink, local_begin = lay.local_begin;
  const int n_cand = lay.n_cand(), forced = lay.forced();

  const float* qs[kMaxGqaGroup];
  for (int g = 0; g < group; ++g) qs[g] = task.q + static_cast<size_t>(row) * task.q_stride + g * d;

  // Score the candidates (blocks between the sinks and the newest blocks).
  thread_local std::vector<float> ub;      // [group][candidate]
  thread_local std::vector<float> gscore;  // [candidate]
  thread_local BlockRanking ranking;
  ub.resize(static_cast<size_t>(group) * n_cand);
  gscore.assign(n_cand, -INFINITY);
  // The oracles use exact block masses (private caches only): for the
  // ranking (gscore) and / or the stop (ub); whatever they leave goes to
  // the bounds, the rest to scratch.
  const bool topk = policy_.kind == AttentionPolicy::Kind::kTopK;
  const bool exact_rank = policy_.oracle_rank && !kv.paged();
  const bool exact_stop = !topk && policy_.oracle_stop && !kv.paged();
  thread_local std::vector<float> scratch_ub, scratch_g, centre;  // centre: [group][candidate]
  // How the stop sizes the unseen mass (see TailEstimate).
  const bool certified = !topk && (policy_.certified || exact_stop);  // ub exact: exact stop
  const bool calibrated =
      !topk && !certified && policy_.tail == AttentionPolicy::TailEstimate::kCalibratedBound;
  const bool centre_est =
      !topk && !certified && policy_.tail == AttentionPolicy::TailEstimate::kCentre;
  if (centre_est) centre.resize(ub.size());
  if (exact_rank || exact_stop) {
    scratch_ub.resize(ub.size());
    scratch_g.resize(n_cand);
  }
  if (!(exact_rank && exact_stop)) {
    // Per-head bounds only for the stops that weigh by them.
    const bool bounds_used = (certified || calibrated) && !exact_stop;
    kv.KeyBounds(task.layer, task.kv_head)
        .Score(qs, group, shape.scale, sink, local_begin, bounds_used ? ub.data() : nullptr,
               n_cand, exact_rank ? scratch_g.data() : gscore.data(),
               centre_est ? centre.data() : nullptr);
  }
  if (exact_rank || exact_stop) {
    ExactBlockScores(kv, task.layer, task.kv_head, sink, n_cand, qs, group, d, shape.scale,
                     exact_stop ? ub.data() : scratch_ub.data(),
                     exact_rank ? gscore.data() : scratch_g.data());
  }
  // The reader StartFetches() began, if any.
  std::optional<KvPageReader> own_reader;
  KvPageReader& reader = task.reader != nullptr && task.n_q == 1
                             ? *task.reader
                             : own_reader.emplace(kv, task.layer, task.kv_head);
  // With a pool, among blocks of about equal promise the resident ones go
  // first. The stop rule does not change, so a block to fetch that holds
  // real mass is still read before the heads can stop.
  if (kv.paged()) BiasNonResident(policy_, reader, lay, gscore.data());
  ranking.Reset(gscore.data(), n_cand);
  const std::vector<int>& order = ranking.order();
  int take = n_cand;  // candidates to consider, in order
  if (topk) take = std::clamp(policy_.top_k - forced, 0, n_cand);
  int sorted = 0;  // order[0, sorted) is final
  auto ensure_sorted = [&](int upto) {
    if (upto > sorted) sorted = ranking.Extend(std::min(upto, take));
  };
  if (topk) ensure_sorted(take);  // PSA ranks lazily: most heads stop early

  // The weighted stops give each candidate a weight w_c = exp(x_c - X),
  // x_c its bound (certified, calibrated; the exact log-mass for the exact
  // stop) or its centre score (centre), X the head's largest: the unseen
  // candidates' weight is then the total minus that of those attended.
  // The weights replace the scores they come from (neither is read again).
  const bool weighted = certified || calibrated || centre_est;
  float* const weight = centre_est ? centre.data() : ub.data();  // [group][candidate]
  double w_total[kMaxGqaGroup];
  float w_max[kMaxGqaGroup];
  if (weighted) {
    for (int g = 0; g < group; ++g) {
      float* w = weight + static_cast<size_t>(g) * n_cand;
      w_max[g] = MaxF32(w, n_cand);
      w_total[g] = n_cand > 0 ? ExpShiftSum(w, n_cand, w_max[g]) : 0.0;
    }
  }

  thread_local std::vector<HeadState> heads;
  heads.resize(group);
  for (HeadState& h : heads) {
    std::vector<float> acc = std::move(h.acc);  // keep the allocation
    h = HeadState{};
    h.acc = std::move(acc);
    h.acc.assign(d, 0.0f);
  }
  thread_local std::vector<float> krow, scores;  // scores: [group][B]
  krow.resize(d);
  scores.resize(static_cast<size_t>(group) * B);

  // Exact attention over one block for every still-active head.
  // c: the block's candidate index, or -1 for an always-attended block.
  // Pages come through the reader: with a pool, the next iteration's blocks
  // are fetched while the current ones are computed.
  const KvRows keys = reader.Keys();
  const KvRows values = reader.Values();
  auto process_block = [&](int b, int c) {
    reader.Page(b);
    const int t0 = b * B, t1 = std::min(n_keys, t0 + B);
    const int n = t1 - t0;
    const bool fast = kBlockKernels && d == 64 && n == 16;  // a full block of 16 rows
    if (fast) {
      BlockScores16x64(keys.row(t0), qs, heads.data(), group, shape.scale, scores.data(), B);
    } else {
      for (int t = t0; t < t1; ++t) {
        Fp16RowToFp32(keys.row(t), krow.data(), d);
        for (int g = 0; g < group; ++g) {
          if (heads[g].active) scores[g * B + (t - t0)] = DotF32(qs[g], krow.data(), d) * shape.scale;
        }
      }
    }
    for (int g = 0; g < group; ++g) {
      HeadState& h = heads[g];
      if (!h.active) continue;
      float* s = &scores[g * B];
      const float bm = MaxF32(s, n);
      if (bm > h.m) {
        const float r = std::exp(h.m - bm);  // 0 on the first block
        h.l *= r;
        if (!std::isinf(h.as_min)) h.as_min *= r;
        h.group_sum *= r;
        h.seen_sum *= r;
        ScaleF32(r, h.acc.data(), d);
        h.m = bm;
      }
      const double sum = ExpShiftSum(s, n, h.m);
      h.l += sum;
      if (n == B) h.as_min = std::min(h.as_min, sum);
      if (c >= 0) {
        h.group_sum += sum;
        h.seen_sum += sum;
        ++h.group_n;
        if (weighted) {
          const double w = weight[static_cast<size_t>(g) * n_cand + c];
          h.group_w += w;
          h.seen_w += w;
        }
      }
      ++h.blocks;
    }
    if (fast) {
      BlockValues16x64(values.row(t0), scores.data(), B, heads.data(), group);
      return;
    }
    for (int t = t0; t < t1; ++t) {
      Fp16RowToFp32(values.row(t), krow.data(), d);
      for (int g = 0; g < group; ++g) {
        if (heads[g].active) AxpyF32(scores[g * B + (t - t0)], krow.data(), heads[g].acc.data(), d);
      }
    }
  };
  // Blocks come in score order, scattered over memory: ask for the next
  // one's page into the CPU caches while this one computes (pool pages
  // being fetched are skipped: the fetch writes them). Always inlined, or
  // GCC deletes the call (see PrefetchBytes).
  auto prefetch_page = [&](int b) __attribute__((always_inline)) {
    if (const uint16_t* p = reader.PageIfReady(b)) PrefetchBytes<3>(p, kv.page_bytes());
  };

  // With a pool, pages not resident are fetched: ask early so transfers
  // overlap computation. A fetch takes far longer than computing a few
  // blocks, so waiting iteration by iteration would stall on every one.
  // Up front: the forced blocks, every candidate the budget floor
  // (min_blocks) makes certain, and as many as the last step read (budgets
  // change little between steps); then, before each iteration, candidates
  // for the next iteration (blocks come in descending criticality, so the
  // next ones are the likeliest to be read) and, with the centre estimate,
  // every block up to where it predicts the heads will stop. Overshooting
  // costs transfers and pool room, so the window stays tight.
  const int G = topk ? std::max(1, take) : policy_.group_blocks;
  constexpr int kMaxPredictedBlocks = 256;  // how far a budget prediction looks
  const bool paged = kv.paged();
  int requested = 0;  // candidates order[0, requested) asked for
  thread_local std::vector<int> ahead;
  auto prefetch_upto = [&](int upto) {
    upto = std::min(upto, take);
    if (!paged || upto <= requested) return;
    ensure_sorted(upto);
    ahead.clear();
    for (int k = requested; k < upto; ++k) ahead.push_back(sink + order[k]);
    reader.Prefetch(ahead);
    requested = upto;
  };
  if (paged) {
    ahead.clear();
    lay.AppendForced(&ahead);
    reader.Prefetch(ahead);
    prefetch_upto(UpfrontCandidates(policy_, lay, kv.ReadHint(task.layer, task.kv_head)));
  }

  // Iteration 1: the sinks and the newest blocks.
  for (int b = 0; b < sink; ++b) process_block(b, -1);
  for (int b = local_begin; b < n_blocks; ++b) process_block(b, -1);
  int next = 0;  // position in `order`
  const bool can_stop = !topk && policy_.epsilon < 1.0f;
  for (int it = 1;; ++it) {
    int deciding = 0;
    int predicted = 0;  // with a pool: where the centre estimate expects the group to stop
    for (int g = 0; g < group; ++g) {
      HeadState& h = heads[g];
      if (!h.deciding) continue;
      h.iterations = it;
      const int left = take - next;
      if (left == 0) {
        h.captured = topk ? -1.0f : 1.0f;
        h.deciding = h.active = false;
        continue;
      }
      if (can_stop && h.blocks >= policy_.min_blocks) {
        double unseen;
        // The unseen candidates' weight (see above); never negative.
        const double w_unseen = std::max(0.0, w_total[g] - h.seen_w);
        if (certified) {
          // Each unseen block's mass is at most B * exp(bound) (the exact
          // stop's x is a block's exact log-mass: no factor B).
          unseen = (exact_stop ? 1 : B) * w_unseen * std::exp(static_cast<double>(w_max[g]) - h.m);
        } else if (calibrated) {
          // The unseen blocks' bounds, scaled by how tight the bounds were
          // on the latest iteration's blocks (actual / bound).
          unseen = h.group_w <= 0 ? INFINITY : w_unseen * (h.group_sum / h.group_w);
        } else if (centre_est) {
          // The unseen blocks hold their share of the centre estimates,
          // scaled by the mass the attended blocks turned out to hold.
          unseen = h.seen_w <= 0 ? INFINITY : w_unseen * (h.seen_sum / h.seen_w);
        } else if (policy_.tail == AttentionPolicy::TailEstimate::kMinSeen) {
          unseen = std::isinf(h.as_min) ? INFINITY : h.as_min * left;
        } else {
          // Blocks come in descending criticality: the latest iteration's
          // mean block mass is the estimate for each block still unseen.
          unseen = h.group_n == 0 ? INFINITY : h.group_sum / h.group_n * left;
        }
        const double p = h.l / (h.l + unseen);
        if (p >= policy_.epsilon) {
          h.captured = static_cast<float>(p);
          h.deciding = false;
          // The group reads on for its other heads: with share_reads this
          // head attends those blocks too, at no extra bytes.
          h.active = policy_.share_reads;
          continue;
        }
        if (paged && centre_est && std::isfinite(unseen)) {
          // The same estimate says how far this head will read: the next
          // blocks in order, each worth its weight times actual/estimate,
          // until eps of (AS_acc + unseen) is held. Fetch that far in one
          // go rather than an iteration at a time.
          const double need = policy_.epsilon * (h.l + unseen) - h.l;
          const double per_w = h.seen_sum / h.seen_w;
          const float* w = weight + static_cast<size_t>(g) * n_cand;
          double got = 0;
          int k = next;
          for (; k < take && k < next + kMaxPredictedBlocks && got < need; ++k) {
            ensure_sorted(k + 1);
            got += per_w * w[order[k]];
          }
          predicted = std::max(predicted, k);
        }
      }
      ++deciding;
    }
    if (deciding == 0) break;
    for (HeadState& h : heads) {
      h.group_sum = 0;
      h.group_w = 0;
      h.group_n = 0;
    }
    const int end = std::min(take, next + G);
    ensure_sorted(end);
    // The next iteration's blocks (and any predicted beyond), while these compute.
    prefetch_upto(std::max(end + G, predicted));
    for (; next < end; ++next) {
      if (next + 1 < sorted) prefetch_page(sink + order[next + 1]);
      process_block(sink + order[next], order[next]);
    }
  }

  if (paged) {
    int most = 0;
    for (int g = 0; g < group; ++g) most = std::max(most, heads[g].blocks);
    kv.ReadHint(task.layer, task.kv_head) = most;
  }
  for (int g = 0; g < group; ++g) {
    float* out = task.out + static_cast<size_t>(row) * task.out_stride + g * d;
    const float inv = static_cast<float>(1.0 / heads[g].l);
    for (int i = 0; i < d; ++i) out[i] = heads[g].acc[i] * inv;
    if (record) {
      task.stats[g] = HeadStepStats{heads[g].blocks, n_blocks, heads[g].iterations,
                                    heads[g].captured};
    }
  }
}

}  // namespace psa
