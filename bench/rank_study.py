#!/usr/bin/env python3
"""How well block scores rank blocks by their exact attention mass, offline.

Reads what `psa_accuracy --dump_dir DIR` wrote (the dense trajectory's
decode queries and the keys) and, for every 4th decode task (one layer, one
KV head, its GQA group of query heads), ranks the candidate blocks (all but
the first and the newest full block) by each score below and takes the
group's top 5, 10 and 20% of the blocks, as top-k would. It prints the
attention mass each head misses, averaged over heads and tasks, and the
share of heads missing more than 0.2 of theirs. Lower is better; the
oracle ranks by the exact mass.

Scores, per head g and block c, from the block's key box [kmin, kmax]
(centre c = (kmax + kmin) / 2, half-width w = (kmax - kmin) / 2):
  bound      q.c + |q|.w  (Quest's upper bound)
  centre     q.c
  widthX     q.c + X |q|.w  (the served estimate: X = 0.2)
  mean       q . (the mean key)
and the group's score of a block: ",max" the largest over the heads, ",sum"
log of the sum of each head's share exp(s_gc) / sum_c' exp(s_gc').

  build/bench/psa_accuracy --model qwen2.5-coder-0.5b --split tune \\
      --contexts 8192 --steps 64 --epsilons "" --topk "" --needle_depths 0 \\
      --dump_dir /tmp/dump
  python3 bench/rank_study.py /tmp/dump --layers 24 --kv-heads 2 --group 7 --head-dim 64
Needs numpy.
"""
import argparse

import numpy as np

import kv_dump
from kv_dump import lse


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kv_dump.add_arguments(ap)
    ap.add_argument("--widths", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--every", type=int, default=4, help="use every N-th task")
    a = ap.parse_args()
    budgets = (0.05, 0.10, 0.20)
    sums = {}
    for t in kv_dump.tasks(a, a.every):
        q, kc, scale, share, forced = t["q"], t["kc"], t["scale"], t["share"], t["forced"]
        nb = t["n_blocks"] - (t["n_forced"] - 2)  # full blocks
        hi, lo = kc.max(1), kc.min(1)
        cs, ws = q @ ((hi + lo) / 2).T * scale, np.abs(q) @ ((hi - lo) / 2).T * scale
        scores = {"bound": cs + ws, "centre": cs, "mean": q @ kc.mean(1).T * scale,
                  "oracle": t["exact"]}
        for w in a.widths.split(","):
            scores[f"width{w}"] = cs + float(w) * ws
        for name, s in scores.items():
            for agg in ("max", "sum"):
                g = s.max(0) if agg == "max" else lse(s - lse(s, 1)[:, None], 0)
                order = np.argsort(-g, kind="stable")
                for b in budgets:
                    k = max(1, round(b * nb) - 2)
                    miss = 1 - forced - share[:, order[:k]].sum(1)
                    acc = sums.setdefault((f"{name},{agg}", b), [0.0, 0.0, 0])
                    acc[0] += miss.mean()
                    acc[1] += np.mean(miss > 0.2)
                    acc[2] += 1
    names = list(dict.fromkeys(k[0] for k in sums))
    print(f"{'score':16}" + "".join(f"  miss@{int(b * 100):2d}%  >0.2@{int(b * 100):2d}%" for b in budgets))
    for n in names:
        cells = (sums[(n, b)] for b in budgets)
        print(f"{n:16}" + "".join(f"  {m / c:9.4f}  {x / c:9.3f}" for m, x, c in cells))


if __name__ == "__main__":
    main()
