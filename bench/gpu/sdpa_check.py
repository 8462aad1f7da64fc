#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention beside psa_gpu_bench, on a GPU.

  --cases DIR   an independent reference: each case psa_gpu_bench --dump
                wrote (q, K, V contiguous, the kernel's dense output) is
                recomputed with SDPA in fp32 and compared (relative L2).
  --contexts / --batches
                a baseline: SDPA decode (fp16, contiguous KV) timed in the
                shapes psa_gpu_bench measures, each run after an L2 flush
                (median), GB/s of KV read. GQA as q [B, kv heads, group, D]
                against K/V [B, kv heads, T, D]: no repeated KV.
Writes JSON to --out. Exit 2 without torch or a GPU (the JSON says why).
scripts/gpu_check.sh runs it.
"""
import argparse
import glob
import json
import math
import os
import sys

SHAPES = [("smollm2", 9, 3, 64), ("llama31_8b", 32, 8, 128)]
REF_TOLERANCE = 1e-4  # relative L2, fp32 against fp32 (fp16 inputs)


def ints(text):
    out = []
    for item in text.split(","):
        item = item.strip()
        if item:
            out.append(int(item[:-1]) * 1024 if item[-1] in "kK" else int(item))
    return out


def check_cases(torch, case_dir):
    import numpy as np
    results = []
    for meta_path in sorted(glob.glob(os.path.join(case_dir, "*.meta.json"))):
        name = os.path.basename(meta_path)[: -len(".meta.json")]
        with open(meta_path) as f:
            meta = json.load(f)
        s, hq, hkv, d, t = (meta[k] for k in ("n_seq", "n_head", "n_head_kv", "head_dim", "context"))
        base = os.path.join(case_dir, name)
        q = np.fromfile(base + ".q.f32", dtype=np.float32).reshape(s, hq, d)
        k = np.fromfile(base + ".k.f16", dtype=np.float16).reshape(s, hkv, t, d)
        v = np.fromfile(base + ".v.f16", dtype=np.float16).reshape(s, hkv, t, d)
        ours = np.fromfile(base + ".out.f32", dtype=np.float32).reshape(s, hq, d)
        g = hq // hkv
        qt = torch.from_numpy(q).cuda().view(s, hkv, g, d)
        kt = torch.from_numpy(k).cuda().float()
        vt = torch.from_numpy(v).cuda().float()
        ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=1.0 / math.sqrt(d))
        ref = ref.reshape(s, hq, d).cpu().double()
        got = torch.from_numpy(ours).double()
        rel = float((got - ref).norm() / ref.norm())
        results.append({"shape": name, "context": t, "batch": s, "rel_l2": rel,
                        "max_abs": float((got - ref).abs().max()), "ok": rel < REF_TOLERANCE})
        print(f"reference {name}: relative L2 {rel:.2e} ({'ok' if rel < REF_TOLERANCE else 'FAIL'})")
    return results


def time_sdpa(torch, contexts, batches, iters):
    results = []
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, hq, hkv, d in SHAPES:
        g = hq // hkv
        for ctx in contexts:
            for b in batches:
                try:
                    k = torch.randn(b, hkv, ctx, d, dtype=torch.float16, device="cuda")
                    v = torch.randn_like(k)
                    q = torch.randn(b, hkv, g, d, dtype=torch.float16, device="cuda")
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    sdpa(q, k, v)
                    times = []
                    for _ in range(iters):
                        flush.zero_()
                        start.record()
                        sdpa(q, k, v)
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                    ms = sorted(times)[len(times) // 2]
                    gbps = 2.0 * b * hkv * ctx * d * 2 / (ms * 1e6)
                    results.append({"shape": name, "context": ctx, "batch": b, "ms": ms, "kv_gbps": gbps})
                    print(f"sdpa {name} ctx {ctx} batch {b}: {ms:.3f} ms, {gbps:.0f} GB/s")
                    del k, v, q
                except RuntimeError as e:  # e.g. out of memory
                    results.append({"shape": name, "context": ctx, "batch": b, "error": str(e)[:200]})
                    print(f"sdpa {name} ctx {ctx} batch {b}: {e}", file=sys.stderr)
                torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="psa_gpu_bench --dump folder")
    ap.add_argument("--contexts", default="8K,32K,128K")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = {}
    try:
        import torch
    except ImportError as e:
        result["error"] = f"no PyTorch: {e}"
    else:
        result["torch"] = torch.__version__
        if not torch.cuda.is_available():
            result["error"] = "PyTorch sees no CUDA device"
        else:
            result["device"] = torch.cuda.get_device_name(0)
            if args.cases:
                result["reference"] = check_cases(torch, args.cases)
            result["sdpa"] = time_sdpa(torch, ints(args.contexts), ints(args.batches), args.iters)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if "error" in result:
        print(result["error"], file=sys.stderr)
        return 2
    return 0 if all(r["ok"] for r in result.get("reference", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
