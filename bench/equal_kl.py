#!/usr/bin/env python3
"""Blocks top-k needs for each policy's KL, from a psa_accuracy CSV.

For every PSA row (and oracle row) of each context, the KV top-k reads at
the same mean KL, interpolated in log-KL between the CSV's top-k points
(extrapolated past the ends, marked "ext"; left out where that goes
below 0), for top-k ranked by the
estimate and by the bound (Quest's), and the ratio: how many times fewer
blocks the policy reads than top-k at equal KL.

  python3 bench/equal_kl.py bench/results/accuracy_qwen15b_32k_test.csv
"""
import csv
import math
import sys


def kv_at(curve, kl):
    """KV of `curve` ((kv, kl) sorted by kv) at this KL; and whether interpolated."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        inside = min(y0, y1) <= kl <= max(y0, y1)
        if inside or (x1, y1) == curve[-1]:
            if y0 == y1:
                return None, False
            t = (math.log(kl) - math.log(y0)) / (math.log(y1) - math.log(y0))
            return x0 + t * (x1 - x0), inside
    return None, False


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        rows = list(csv.DictReader(open(path)))
        for ctx in sorted({r["context"] for r in rows}, key=int):
            here = [r for r in rows if r["context"] == ctx]

            def curve(bound):
                return sorted((float(r["kv_read_fraction"]), float(r["kl"])) for r in here
                              if r["kind"] == "topk" and "oracle" not in r["policy"]
                              and ("rank=bound" in r["policy"]) == bound)

            curves = {"top-k (estimate)": curve(False), "top-k (bound)": curve(True)}
            print(f"{path}, context {ctx}")
            for r in here:
                if r["kind"] != "psa" and "oracle" not in r["policy"]:
                    continue
                kv, kl = float(r["kv_read_fraction"]), float(r["kl"])
                cells = []
                for name, c in curves.items():
                    if len(c) < 2 or kl <= 0:
                        continue
                    at, inside = kv_at(c, kl)
                    if at is not None and at > 0:
                        cells.append(f"{name} {100 * at:5.1f}%{'' if inside else ' ext'} = {at / kv:.2f}x")
                print(f"  {r['policy']:55} read {100 * kv:5.1f}% KL {kl:.4f} top-1 {float(r['top1']):.3f}  "
                      + "  ".join(cells))


if __name__ == "__main__":
    main()
