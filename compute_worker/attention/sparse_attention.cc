#include "compute_worker/attention/sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "compute_worker/attention/block_layout.h"
#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/attention/head_state.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/attention/rank_scores.h"
#include "compute_worker/attention/research/exact_block_scores.h"
#include "compute_worker/attention/sparse_block_kernels.h"
#include "compute_worker/attention/stop_rule.h"
#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/kv/kv_page_reader.h"
#include "compute_worker/model/llama_model.h"

namespace psa {

std::unique_ptr<AttentionBackend> MakeAttention(const AttentionPolicy& policy) {
  if (policy.kind == AttentionPolicy::Kind::kDense) return std::make_unique<DenseAttention>();
  return std::make_unique<SparseAttention>(policy);
}

std::string_view SparseAttention::name() const {
  return policy_.kind == AttentionPolicy::Kind::kTopK ? "topk" : "psa";
}

void SparseAttention::Run(const AttentionShape& shape, const AttentionTask& task) const {
  // A retrieval head's target is one key that its block's metadata does
  // not reveal (compute_worker/runtime/retrieval_heads.h): read it all.
  if (!task.prefill && task.retrieval_head && policy_.retrieval_dense) {
    dense_.Run(shape, task);
    return;
  }
  if (task.prefill) {
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
  KvCache& kv = *task.kv;
  if (!kv.paged() || task.prefill || task.n_q != 1) return nullptr;
  if (task.retrieval_head && policy_.retrieval_dense) return nullptr;  // Run() reads it all
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
    RankScores(kv.KeyBounds(task.layer, task.kv_head), policy_.rank, qs, group, shape.scale,
               lay.sink, n_cand, nullptr, nullptr, gscore.data());
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
  KvCache& kv = *task.kv;
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
  const bool exact_rank = research_.oracle_rank && !kv.paged();
  const bool exact_stop = !topk && research_.oracle_stop && !kv.paged();
  // The stop's estimate scores: [group][candidate], each block's mean-key
  // score (the box centre's for the research variant).
  thread_local std::vector<float> scratch_ub, scratch_g, estimate;
  StopRule stop(policy_, research_.tail, exact_stop);
  if (stop.wants_estimate()) estimate.resize(ub.size());
  const bool box_centre = research_.box_centre_stop;
  if (exact_rank || exact_stop) {
    scratch_ub.resize(ub.size());
    scratch_g.resize(n_cand);
  }
  const bool norm_rank = research_.normalized_rank && !exact_rank;
  if (norm_rank && exact_stop) scratch_ub.resize(ub.size());
  if (!(exact_rank && exact_stop)) {
    float* bounds = stop.wants_bounds() ? ub.data() : nullptr;
    if (norm_rank) bounds = exact_stop ? scratch_ub.data() : ub.data();
    RankScores(kv.KeyBounds(task.layer, task.kv_head),
               norm_rank ? AttentionPolicy::Rank::kBound : policy_.rank, qs, group, shape.scale,
               sink, n_cand, bounds,
               stop.wants_estimate() && box_centre ? estimate.data() : nullptr,
               exact_rank ? scratch_g.data() : gscore.data(),
               stop.wants_estimate() && !box_centre ? estimate.data() : nullptr);
    if (norm_rank) NormalizedGroupScores(bounds, group, n_cand, gscore.data());
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

  // The weighted stops weigh each candidate by its bound (the exact
  // log-mass for the exact stop) or its estimate score.
  if (stop.weighted()) stop.Weigh(stop.estimate() ? estimate.data() : ub.data(), group, n_cand);

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
    // A full block of 16 rows: the block kernels.
    const bool fast = kBlockKernels && d == 64 && n == 16;
    const bool fast128 = kBlockKernels && d == 128 && n == 16;
    if (fast) {
      BlockScores16x64(keys.row(t0), qs, heads.data(), group, shape.scale, scores.data(), B);
    } else if (fast128) {
      BlockScores16x128(keys.row(t0), qs, heads.data(), group, shape.scale, scores.data(), B);
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
        const float r = PsaRescale(h.m, bm);  // 0 on the first block
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
        if (stop.weighted()) {
          const double w = stop.weight(g, c);
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
    if (fast128) {
      BlockValues16x128(values.row(t0), scores.data(), B, heads.data(), group);
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
  // next ones are the likeliest to be read) and, with the stop's estimate,
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
    int predicted = 0;  // with a pool: where the stop's estimate expects the group to stop
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
      // The decision is psa_math.h's, shared with the CUDA kernels.
      if (can_stop && PsaMayStop(h.blocks, policy_.min_blocks)) {
        const double unseen = stop.Unseen(h, g, left, B);
        const double p = PsaCaptured(h.l, unseen);
        if (PsaStops(p, policy_.epsilon)) {
          h.captured = static_cast<float>(p);
          h.deciding = false;
          // The group reads on for its other heads: with share_reads this
          // head attends those blocks too, at no extra bytes.
          h.active = policy_.share_reads;
          continue;
        }
        if (paged && stop.estimate() && std::isfinite(unseen)) {
          // The same estimate says how far this head will read: the next
          // blocks in order, each worth its weight times actual/estimate,
          // until eps of (AS_acc + unseen) is held. Fetch that far in one
          // go rather than an iteration at a time.
          const double need = policy_.epsilon * (h.l + unseen) - h.l;
          const double per_w = h.seen_sum / h.seen_w;
          const float* w = stop.weights(g);
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
