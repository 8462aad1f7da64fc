#!/usr/bin/env python3
"""Plots psa_accuracy's CSV: accuracy versus the fraction of KV touched, the
PSA curve (epsilon sweep) against the top-k curve (k sweep), one panel per
context length, plus PSA's per-layer KV fraction when --layers is given.

    build/bench/psa_accuracy --model M --csv acc.csv --layers_csv layers.csv
    python3 bench/plot_accuracy.py acc.csv --layers layers.csv --out accuracy.png

Needs matplotlib (python3 -m pip install matplotlib).
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="CSV written by psa_accuracy --csv")
    ap.add_argument("--layers", help="CSV written by psa_accuracy --layers_csv")
    ap.add_argument("--policy", default="psa(eps=0.95,G=4)",
                    help="policy whose per-layer budget is drawn (default: %(default)s)")
    ap.add_argument("--metric", default="kl", choices=["kl", "top1", "rel_err"],
                    help="accuracy metric on the y axis (default: %(default)s)")
    ap.add_argument("--out", default="accuracy.png", help="PNG to write (default: %(default)s)")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is missing: python3 -m pip install matplotlib", file=sys.stderr)
        return 1

    rows = list(csv.DictReader(open(args.csv)))
    if not rows:
        print(f"error: {args.csv} has no rows", file=sys.stderr)
        return 1
    def series(r):  # one curve per policy family: the swept parameter varies along it
        # Options as AttentionPolicy::ToString() names them (",min" is not ",min_blocks=").
        has = lambda option: re.search(option + r"[,)]", r["policy"]) is not None
        # Other rankings (rank= other than the kind's default; psa_accuracy --oracle,
        # --normalized_rank) are their own curves.
        suffix = (", oracle ranking" if has(",oracle") else ", normalized rank" if has(",norm")
                  else ", bound ranking" if has(",rank=bound")
                  else ", estimate ranking" if has(",rank=estimate") else "")
        if r["kind"] != "psa":
            return r["kind"] + suffix
        return ("psa, certified" if has(",certified") else
                "psa, paper AS_min" if has(",min") else
                "psa, last-group mean" if has(",mean") else
                "psa, calibrated bound" if has(",cal") else "psa") + suffix

    by_ctx = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] in ("psa", "topk"):
            by_ctx[int(r["context"])][series(r)].append((float(r["kv_fraction"]), float(r[args.metric])))
    layers = list(csv.DictReader(open(args.layers))) if args.layers else []
    n_panels = len(by_ctx) + (1 if layers else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), squeeze=False)
    for ax, ctx in zip(axes[0], sorted(by_ctx)):
        for kind, style in (("psa", "o-"), ("psa, paper AS_min", "^:"), ("psa, certified", "v-."),
                            ("psa, calibrated bound", "d-"), ("psa, last-group mean", "x:"),
                            ("topk", "s--"), ("psa, oracle ranking", "o:"),
                            ("topk, oracle ranking", "s:"), ("psa, normalized rank", "P-."),
                            ("topk, normalized rank", "X-."), ("psa, bound ranking", "^-"),
                            ("topk, bound ranking", "v--"), ("psa, estimate ranking", "D-")):
            pts = sorted(by_ctx[ctx][kind])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
        ax.set_title(f"context {ctx}")
        ax.set_xlabel("fraction of KV touched (dense = 1)")
        ax.set_ylabel({"kl": "KL(dense || policy)", "top1": "top-1 agreement",
                       "rel_err": "attention output rel. error"}[args.metric])
        if args.metric != "top1":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if layers:
        ax = axes[0][-1]
        for ctx in sorted({int(r["context"]) for r in layers}):
            pts = [(int(r["layer"]), float(r["kv_fraction"])) for r in layers
                   if int(r["context"]) == ctx and r["policy"] == args.policy]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"context {ctx}")
        ax.set_title(f"{args.policy}: KV fraction per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of KV touched")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
