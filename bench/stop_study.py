#!/usr/bin/env python3
"""How PSA's stop rules size the unseen mass, offline, on dumped real KV.

Reads what `psa_accuracy --dump_dir DIR` wrote (the dense trajectory's
decode queries and the keys) and replays PSA's selection for every N-th
decode task (one layer, one KV head, its GQA group): candidates (all blocks
but the first and the newest full one, which are always attended) in the
group's rank order, G per iteration; each head stops once its captured
fraction P = AS_acc / (AS_acc + unseen) reaches epsilon after min_blocks
blocks, and the group reads on until its last head stops (shared reads, as
served). It prints, per rule and epsilon, the KV read and the attention
mass the heads miss: mean, 99th percentile, and the share of heads missing
more than 0.3 of their mass ("large misses", the ones that cost answers).
Top-k rows (same ranking, fixed budget) are the baseline at equal KV.

Rules for `unseen` (w_c = exp(x_c - X) over the candidates, x a score):
  mean      x = q.mean (the block's mean key), scaled by the attended
            candidates' actual / w (served since 2026-12-07)
  centre    the same with x = q.c, c the key box's centre (served before)
  latest    centre scaled by the latest iteration's actual / w
  maxratio  centre scaled by the larger of the two ratios
  rank      x = the ranking estimate (q.c + 0.4 |q|.r)
  box       x = log E exp(q.k) for keys spread evenly over the box
  oracle    the exact unseen mass (the exact stop)
Rankings (--ranks): estimate (served top-k's), bound (Quest's, PSA's
default), mean, box. It also prints, per score, how well it predicts a
block's log-mass (the residual's mass-weighted spread after a per-head
constant, and the correlation).

  build/bench/psa_accuracy --model qwen2.5-coder-1.5b --split tune \\
      --contexts 16384 --steps 64 --epsilons "" --topk "" --needle_depths 0 \\
      --dump_dir /tmp/dump
  python3 bench/stop_study.py /tmp/dump --context 16384 --layers 28 \\
      --kv-heads 2 --group 6 --head-dim 128
Needs numpy.
"""
import argparse

import numpy as np

import kv_dump
from kv_dump import B, lse

WIDTH = 0.4  # psa_math.h kPsaRankWidth


def tasks(a):
    for t in kv_dump.tasks(a, a.every):
        q, kc, scale = t["q"], t["kc"], t["scale"]
        hi, lo = kc.max(1), kc.min(1)
        cs = q @ ((hi + lo) / 2).T * scale
        ws = np.abs(q) @ ((hi - lo) / 2).T * scale
        # The block's mass if its keys were spread evenly over the box:
        # log E exp(s) = q.c + sum_i log(sinh(a_i) / a_i), a_i = scale |q_i| w_i.
        a_ = np.maximum(np.abs(q)[:, None, :] * ((hi - lo) / 2)[None] * scale, 1e-6)  # [G][cand][D]
        lsinh = np.where(a_ > 20, a_ - np.log(2 * a_), np.log(np.sinh(np.minimum(a_, 20)) / a_))
        t.update(centre=cs, rank=cs + WIDTH * ws, bound=cs + ws, box=cs + lsinh.sum(2) + np.log(B),
                 mean=q @ kc.mean(1).T * scale + np.log(B))
        yield t


def group_order(t, ranking):
    if ranking == "bound":
        g = t["bound"].max(0)
    else:
        s = t[{"estimate": "rank"}.get(ranking, ranking)]
        g = lse(s - lse(s, 1)[:, None], 0)
    return np.argsort(-g, kind="stable")


def weights(x):
    return np.exp(x - x.max(1, keepdims=True))


def prefix_stop(t, order, rule, eps, G, min_blocks):
    """Candidates read (a prefix of `order`) before the group's last head stops."""
    share = t["share"][:, order]
    n = share.shape[1]
    cm = np.concatenate([np.zeros((share.shape[0], 1)), np.cumsum(share, 1)], 1)  # [G][n+1]
    if rule == "oracle":
        unseen = cm[:, -1:] - cm
    else:
        x = t[rule] if rule in ("rank", "box", "mean") else t["centre"]
        w = weights(x)[:, order]
        cw = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w, 1)], 1)
        W = cw[:, -1:]
        ratio_all = np.where(cw > 0, cm / np.maximum(cw, 1e-300), np.inf)
        if rule in ("latest", "maxratio"):
            k = np.arange(n + 1)
            prev = np.maximum(0, k - G)
            dm = cm - cm[:, prev]
            dw = cw - cw[:, prev]
            ratio_last = np.where(dw > 0, dm / np.maximum(dw, 1e-300), np.inf)
            ratio = ratio_last if rule == "latest" else np.maximum(ratio_all, ratio_last)
        else:
            ratio = ratio_all
        with np.errstate(invalid="ignore"):
            unseen = np.maximum(W - cw, 0) * ratio
        unseen[:, 0] = np.inf
    l = t["forced"][:, None] + cm
    with np.errstate(invalid="ignore"):
        p = np.where(np.isinf(unseen), 0.0, l / (l + unseen))
    checks = np.arange(0, n + 1, G)
    checks = checks[t["n_forced"] + checks >= min_blocks]
    stop = np.full(share.shape[0], n)
    if eps < 1 and checks.size:
        ok = p[:, checks] >= eps
        first = np.where(ok.any(1), checks[ok.argmax(1)], n)
        stop = np.minimum(first, n)
    return int(stop.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kv_dump.add_arguments(ap, context=16384)
    ap.add_argument("--every", type=int, default=2, help="use every N-th task")
    ap.add_argument("--epsilons", default="0.6,0.7,0.8,0.9")
    ap.add_argument("--rules", default="mean,centre,oracle")
    ap.add_argument("--ranks", default="estimate,bound")
    ap.add_argument("--topk", default="0.05,0.1,0.15,0.2,0.3", help="top-k budgets, fractions of the blocks")
    ap.add_argument("--min-blocks", type=int, default=24)
    ap.add_argument("--G", type=int, default=4)
    a = ap.parse_args()
    eps = [float(e) for e in a.epsilons.split(",") if e]
    rows = {}

    def add(name, read, miss):
        r = rows.setdefault(name, [[], []])
        r[0].append(read)
        r[1].append(miss)

    calib = {}
    for t in tasks(a):
        # How well each score predicts a block's log-mass up to a per-head
        # constant: the residual's spread, weighted by the blocks' mass.
        for name in ("centre", "rank", "bound", "box", "mean"):
            r = t["exact"] - t[name]
            wt = t["share"] / t["share"].sum(1, keepdims=True)
            mu = (wt * r).sum(1, keepdims=True)
            c = calib.setdefault(name, [0.0, 0.0, 0])
            c[0] += np.sqrt((wt * (r - mu) ** 2).sum(1)).mean()
            c[1] += np.mean([np.corrcoef(t["exact"][g], t[name][g])[0, 1] for g in range(r.shape[0])])
            c[2] += 1
        nb, nf = t["n_blocks"], t["n_forced"]
        total_share = t["forced"] + t["share"].sum(1)
        for ranking in a.ranks.split(","):
            order = group_order(t, ranking)
            cum = np.cumsum(t["share"][:, order], 1)
            for f in (float(x) for x in a.topk.split(",") if x):
                k = min(cum.shape[1], max(0, round(f * nb) - nf))
                got = t["forced"] + (cum[:, k - 1] if k else 0)
                add(f"topk {f:.2f} {ranking}", (nf + k) / nb, total_share - got)
            for rule in a.rules.split(","):
                for e in eps:
                    k = prefix_stop(t, order, rule, e, a.G, a.min_blocks)
                    got = t["forced"] + (cum[:, k - 1] if k else 0)
                    add(f"psa {e} {rule} {ranking}", (nf + k) / nb, total_share - got)
    for name, (sd, cc, n) in calib.items():
        print(f"score {name:8} residual sd (mass-weighted) {sd / n:.3f}  correlation {cc / n:.3f}")
    print(f"{'policy':28} {'read':>7} {'miss':>7} {'p99':>7} {'>0.3':>7} {'max':>6}")
    for name, (read, miss) in rows.items():
        m = np.concatenate(miss)
        print(f"{name:28} {np.mean(read):7.3f} {m.mean():7.4f} {np.quantile(m, 0.99):7.4f} "
              f"{np.mean(m > 0.3):7.4f} {m.max():6.3f}")


if __name__ == "__main__":
    main()
