#!/usr/bin/env python3
"""Merges scripts/gpu_check.sh's steps, psa_gpu_bench's JSON and
sdpa_check.py's JSON into summary.json and summary.md (ratios against the
baselines of the same run: the device copy, PyTorch SDPA, dense).

  summarize.py --steps STEPS.tsv [--bench B.json] [--bench_md B.md]
               [--sdpa S.json] --out_json J --out_md M
STEPS.tsv: one line per step, "name<TAB>status<TAB>seconds<TAB>note".
--self-test: runs on made-up inputs and checks the output.
"""
import argparse
import json
import os
import sys
import tempfile


def load(path):
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"unreadable {path}: {e}"}


def summarize(steps_path, bench_path, bench_md_path, sdpa_path):
    steps = []
    if steps_path and os.path.exists(steps_path):
        with open(steps_path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    steps.append({"step": parts[0], "status": parts[1], "seconds": float(parts[2]),
                                  "note": parts[3] if len(parts) > 3 else ""})
    bench, sdpa = load(bench_path), load(sdpa_path)
    summary = {"steps": steps, "ok": bool(steps) and all(s["status"] in ("pass", "skip") for s in steps)}
    if bench and "records" in bench:
        summary["device"] = bench.get("device")
        recs = bench["records"]
        copy = next((r["gbps"] for r in recs if r["kind"] == "copy"), None)
        summary["copy_gbps"] = copy
        dense = [r for r in recs if r["kind"] == "dense"]
        base = {(r["shape"], r["context"], r["batch"]): r for r in (sdpa or {}).get("sdpa", []) if "ms" in r}
        for r in dense:
            b = base.get((r["shape"], r["context"], r["batch"]))
            if b:
                r["sdpa_ms"] = b["ms"]
                r["vs_sdpa"] = b["ms"] / r["ms"]  # > 1: faster than SDPA
        summary["dense"] = dense
        summary["selection"] = [r for r in recs if r["kind"] == "selection"]
        summary["paging"] = [r for r in recs if r["kind"] == "paging"]
        for r in recs:
            if r["kind"] == "stall" and r["miss"] in (0.1, 0.5):
                summary[f"stall_ms_at_{round(100 * r['miss'])}pct_misses"] = r["stall_ms"]
        if summary["paging"]:
            # Per page size the better of the two ways (Refill's choice is by measurement).
            best = {}
            for r in summary["paging"]:
                best[r["page_bytes"]] = max(best.get(r["page_bytes"], 0), r["of_pinned_copy"])
            summary["paging_min_of_pinned_copy"] = min(best.values())
        if dense:
            summary["dense_best_of_copy"] = max(r["of_copy"] for r in dense)
            big = [r for r in dense if r["context"] >= 32768 and r["batch"] >= 8]
            if big:
                summary["dense_min_of_copy_32k_plus_batch_8_plus"] = min(r["of_copy"] for r in big)
            vs = [r["vs_sdpa"] for r in dense if "vs_sdpa" in r]
            if vs:
                summary["dense_min_vs_sdpa"] = min(vs)
        at10 = [r for r in summary["selection"] if abs(r["share"] - 0.10) < 1e-6]
        if at10:
            summary["psa_step_vs_dense_at_10pct_max"] = max(r["psa_step_vs_dense"] for r in at10)
            ordered = [r["psa_ordered_step_vs_dense"] for r in at10 if "psa_ordered_step_vs_dense" in r]
            if ordered:
                summary["psa_ordered_step_vs_dense_at_10pct_max"] = max(ordered)
        unequal = [r for r in summary["selection"] if r.get("order_equal") is False]
        if unequal:  # the device order must equal a host sort of the same scores
            summary["ok"] = False
            summary["device_order_differs"] = len(unequal)
    if sdpa:
        summary["reference"] = sdpa.get("reference")
        if "error" in sdpa:
            summary["sdpa_error"] = sdpa["error"]
    md = ["# GPU check (issue 21)", ""]
    md.append(f"Device: {summary.get('device', 'unknown')}. Overall: {'PASS' if summary['ok'] else 'FAIL'}.")
    md += ["", "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |" for s in steps]
    for key, label in [("dense_best_of_copy", "dense KV read, best share of the copy bandwidth (goal >= 0.80)"),
                       ("dense_min_of_copy_32k_plus_batch_8_plus", "dense, worst share of copy at >= 32K x >= 8"),
                       ("dense_min_vs_sdpa", "dense, worst speed against SDPA (goal >= 1.0)"),
                       ("psa_step_vs_dense_at_10pct_max", "PSA + scores step vs dense at 10%, worst (goal <= 0.15)"),
                       ("psa_ordered_step_vs_dense_at_10pct_max",
                        "PSA + scores + device order vs dense at 10%, worst"),
                       ("paging_min_of_pinned_copy",
                        "host to GPU paging, worst share of a pinned copy's GB/s (goal >= 0.80)"),
                       ("stall_ms_at_10pct_misses", "dense step, extra ms with 10% of pages read from host"),
                       ("stall_ms_at_50pct_misses", "dense step, extra ms with 50% of pages read from host"),
                       ("device_order_differs", "selection runs whose device order differs from the host sort (must be 0)")]:
        if key in summary:
            md.append(f"- {label}: {summary[key]:.2f}")
    for r in summary.get("reference") or []:
        md.append(f"- dense against SDPA fp32, {r['shape']}: relative L2 {r['rel_l2']:.1e} ({'ok' if r['ok'] else 'FAIL'})")
    if summary.get("dense"):
        md += ["", "## Dense decode against SDPA", "", "| shape | context | batch | ms | KV GB/s | of copy | SDPA ms | vs SDPA |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in summary["dense"]:
            md.append(f"| {r['shape']} | {r['context'] // 1024}K | {r['batch']} | {r['ms']:.3f} | {r['kv_gbps']:.0f} | "
                      f"{100 * r['of_copy']:.0f}% | {r.get('sdpa_ms', float('nan')):.3f} | {r.get('vs_sdpa', float('nan')):.2f}x |")
    if bench_md_path and os.path.exists(bench_md_path):
        with open(bench_md_path) as f:
            md += ["", f.read()]
    return summary, "\n".join(md) + "\n"


def self_test():
    with tempfile.TemporaryDirectory() as tmp:
        steps = os.path.join(tmp, "steps.tsv")
        with open(steps, "w") as f:
            f.write("gpu_tests\tpass\t12.5\t\nbench\tpass\t100\t\n")
        bench = os.path.join(tmp, "bench.json")
        with open(bench, "w") as f:
            json.dump({"device": "Fake H100", "records": [
                {"kind": "copy", "gbps": 3000.0},
                {"kind": "dense", "shape": "smollm2", "context": 32768, "batch": 8, "splits": 4, "ms": 0.5,
                 "kv_gbps": 2400.0, "of_copy": 0.8},
                {"kind": "selection", "shape": "smollm2", "context": 32768, "batch": 1, "share": 0.1,
                 "dense_ms": 1.0, "scores_ms": 0.02, "topk_ms": 0.1, "psa_ms": 0.12, "psa_read": 0.11,
                 "topk_vs_dense": 0.1, "psa_vs_dense": 0.12, "psa_step_vs_dense": 0.14,
                 "order_ms": 0.01, "order_equal": True, "psa_ordered_step_vs_dense": 0.15},
                {"kind": "paging", "copy": "gather", "page_bytes": 4096, "pages": 8192,
                 "refill_gbps": 5.0, "pages_per_s": 1e6, "pinned_copy_gbps": 25.0,
                 "of_pinned_copy": 0.2},
                {"kind": "stall", "shape": "smollm2", "context": 32768, "batch": 8, "miss": 0.1,
                 "device_ms": 1.0, "pooled_ms": 1.5, "stall_ms": 0.5},
                {"kind": "paging", "copy": "dma", "page_bytes": 4096, "pages": 8192,
                 "refill_gbps": 20.0, "pages_per_s": 5e6, "pinned_copy_gbps": 25.0,
                 "of_pinned_copy": 0.8}]}, f)
        sdpa = os.path.join(tmp, "sdpa.json")
        with open(sdpa, "w") as f:
            json.dump({"sdpa": [{"shape": "smollm2", "context": 32768, "batch": 8, "ms": 0.6, "kv_gbps": 2000.0}],
                       "reference": [{"shape": "smollm2", "context": 1007, "batch": 2, "rel_l2": 1e-7,
                                      "max_abs": 1e-7, "ok": True}]}, f)
        summary, md = summarize(steps, bench, None, sdpa)
    assert summary["ok"], summary
    assert abs(summary["dense"][0]["vs_sdpa"] - 1.2) < 1e-9, summary
    assert abs(summary["psa_step_vs_dense_at_10pct_max"] - 0.14) < 1e-9
    assert abs(summary["psa_ordered_step_vs_dense_at_10pct_max"] - 0.15) < 1e-9
    assert abs(summary["paging_min_of_pinned_copy"] - 0.8) < 1e-9
    assert abs(summary["stall_ms_at_10pct_misses"] - 0.5) < 1e-9
    assert "| smollm2 | 32K | 8 |" in md and "PASS" in md, md
    summary, md = summarize(None, None, None, None)
    assert not summary["ok"] and "FAIL" in md
    print("summarize.py self-test: ok")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps")
    ap.add_argument("--bench")
    ap.add_argument("--bench_md")
    ap.add_argument("--sdpa")
    ap.add_argument("--out_json")
    ap.add_argument("--out_md")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if not args.out_json or not args.out_md:
        ap.error("--out_json and --out_md are required")
    summary, md = summarize(args.steps, args.bench, args.bench_md, args.sdpa)
    with open(args.out_json, "w") as f:
        json.dump(summary, f, indent=1)
    with open(args.out_md, "w") as f:
        f.write(md)
    print(md)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
