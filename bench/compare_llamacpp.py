#!/usr/bin/env python3
"""Compare PSA-Serve's runtime speed with llama.cpp's on the same model and threads.

Runs (or loads saved results of) two benchmarks that print the same JSON schema

    {"impl": str, "version": str, "threads": n,
     "prefill_tps": {"<ctx>": tok/s or null, ...},
     "decode_tps": {"<batch>": {"<ctx>": tok/s or null, ...}, ...},
     "prefill_tps_best": {...}, "decode_tps_best": {...},   (optional)
     "meta": {"reps": R, "stat": "median", "stat_text": str, ...}}   (optional)

  * ours:      <ours> --model M --threads T --contexts C,.. --batches B,..
               --decode_tokens N --reps R --json  (default build/bench/psa_runtime_bench)
  * llama.cpp: <ref-python> bench/llamacpp_bench.py with the same settings
               (plus --flash-attn from --ref-flash-attn)

Both sides measure alike: one 512-token warm-up prefill; per context R timed
prefills; per batch size one untimed warm-up decode step, then R timed runs of
N steps continuing the same sequences; tok/s is the median of the R runs and
"best" the fastest.  The table has one row per prefill@ctx and decode@batch/ctx
and the columns: ours and llama.cpp's median tok/s and their time ratio
llama_tps / ours_tps (= our time per token / llama.cpp's time per token; below
1 means PSA-Serve is faster), then the same for the best runs.  It states the
statistic, and warns when the two results were not measured alike (e.g. saved
JSON from an older version).

If the reference interpreter (--ref-python) is missing or cannot import
llama_cpp and numpy, only our numbers are printed, with a note.  --ours-json /
--ref-json reuse saved JSON results instead of running a benchmark;
--save-ours / --save-ref store the fresh results.  Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OURS = REPO_ROOT / "build" / "bench" / "psa_runtime_bench"
DEFAULT_MODEL = Path("/root/.cache/psa-serve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_REF_PYTHON = Path("/root/.cache/psa-serve/venv-ref/bin/python")
REF_SCRIPT = Path(__file__).resolve().parent / "llamacpp_bench.py"
RATIO_HEADER = "time ratio (<1 is faster than llama.cpp)"


def note(msg: str) -> None:
    print(f"[compare_llamacpp] {msg}", file=sys.stderr, flush=True)


class CompareError(Exception):
    pass


def csv_ints(s: str) -> str:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return ",".join(str(v) for v in vals)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run PSA-Serve's bench and llama.cpp's reference bench with the same "
                    "settings and print a tokens/s comparison table.",
    )
    p.add_argument("--ours", type=Path, default=DEFAULT_OURS,
                   help="PSA-Serve bench binary (default: build/bench/psa_runtime_bench under the repo root, i.e. %(default)s)")
    p.add_argument("--ref-python", type=Path, default=DEFAULT_REF_PYTHON,
                   help="Python interpreter with llama_cpp + numpy, used to run bench/llamacpp_bench.py (default: %(default)s)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for both implementations (default: %(default)s)")
    p.add_argument("--contexts", type=csv_ints, default="512,2048,8192", help="comma-separated context lengths (default: %(default)s)")
    p.add_argument("--batches", type=csv_ints, default="1,8,32", help="comma-separated decode batch sizes (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per configuration (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="context 512 and batches 1,8 only (overrides --contexts/--batches)")
    p.add_argument("--haystack", type=Path, default=None,
                   help="essay directory passed to llamacpp_bench.py (default: its own default, ../shared/eval/haystack)")
    p.add_argument("--ref-flash-attn", choices=["auto", "on", "off", "best"], default="auto",
                   help="--flash-attn for llamacpp_bench.py; auto is llama.cpp's default, best takes "
                        "the faster of on/off per entry (default: %(default)s)")
    p.add_argument("--reps", "--ref-reps", dest="reps", type=int, default=3,
                   help="timed repetitions of every prefill and decode configuration, for both "
                        "implementations; the median is compared (and the fastest as 'best') "
                        "(default: %(default)s)")
    p.add_argument("--ours-json", type=Path, help="load our results from this JSON file instead of running --ours")
    p.add_argument("--ref-json", type=Path, help="load llama.cpp results from this JSON file instead of running it")
    p.add_argument("--save-ours", type=Path, help="write our fresh results to this JSON file")
    p.add_argument("--save-ref", type=Path, help="write llama.cpp's fresh results to this JSON file")
    p.add_argument("--ref-only", action="store_true", help="do not run or load our results")
    p.add_argument("--json", action="store_true",
                   help="print {\"ours\": ..., \"llama.cpp\": ...} as JSON instead of the table")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.decode_tokens < 1:
        p.error("--decode-tokens must be >= 1")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.quick:
        args.contexts, args.batches = "512", "1,8"
    return args


def validate(res: object, origin: str) -> dict:
    if not isinstance(res, dict):
        raise CompareError(f"{origin}: expected a JSON object, got {type(res).__name__}")
    for key, typ in (("prefill_tps", dict), ("decode_tps", dict)):
        if not isinstance(res.get(key), typ):
            raise CompareError(f"{origin}: missing or malformed {key!r}")
    for b, row in res["decode_tps"].items():
        if not isinstance(row, dict):
            raise CompareError(f"{origin}: decode_tps[{b!r}] is not an object")
    return res


def parse_json_output(text: str, origin: str) -> dict:
    text = text.strip()
    try:
        return validate(json.loads(text), origin)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):  # tolerate log lines before the JSON
        line = line.strip()
        if line.startswith("{"):
            try:
                return validate(json.loads(line), origin)
            except json.JSONDecodeError:
                continue
    raise CompareError(f"{origin}: no JSON object found in its stdout")


def load_json(path: Path, origin: str) -> dict:
    try:
        return parse_json_output(path.read_text(encoding="utf-8"), f"{origin} ({path})")
    except OSError as e:
        raise CompareError(f"cannot read {path}: {e}")


def run_cmd(cmd: list[str], origin: str) -> dict:
    note("running: " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    except OSError as e:
        raise CompareError(f"cannot run {origin}: {e}")
    if proc.returncode == 130:  # llamacpp_bench.py was interrupted but printed partial results
        note(f"{origin} was interrupted; using its partial results")
    elif proc.returncode != 0:
        raise CompareError(f"{origin} exited with status {proc.returncode}")
    return parse_json_output(proc.stdout, origin)


def common_flags(args: argparse.Namespace, sep: str = "-") -> list[str]:
    """Shared settings; our C++ bench spells multi-word flags with '_' (absl)."""
    return ["--model", str(args.model), "--threads", str(args.threads),
            "--contexts", args.contexts, "--batches", args.batches,
            f"--decode{sep}tokens", str(args.decode_tokens), "--reps", str(args.reps)]


def ref_usable(py: Path) -> str | None:
    """Return None if py can import llama_cpp and numpy, else a reason."""
    if not py.exists():
        return f"reference interpreter {py} does not exist"
    try:
        proc = subprocess.run([str(py), "-c", "import llama_cpp, numpy"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return f"cannot run {py}: {e}"
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return f"{py} cannot import llama_cpp/numpy: {err[-1] if err else 'unknown error'}"
    return None


def get_ours(args: argparse.Namespace) -> dict | None:
    if args.ref_only:
        return None
    if args.ours_json:
        return load_json(args.ours_json, "ours")
    if not args.ours.exists():
        raise CompareError(f"our bench binary {args.ours} does not exist (build it, or pass --ours, "
                           "--ours-json or --ref-only)")
    res = run_cmd([str(args.ours.absolute())] + common_flags(args, "_") + ["--json"], "ours")
    if args.save_ours:
        args.save_ours.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return res


def get_ref(args: argparse.Namespace) -> tuple[dict | None, str | None]:
    if args.ref_json:
        return load_json(args.ref_json, "llama.cpp"), None
    why = ref_usable(args.ref_python)
    if why:
        return None, why
    cmd = [str(args.ref_python), str(REF_SCRIPT)] + common_flags(args)
    cmd += ["--flash-attn", args.ref_flash_attn]
    if args.haystack is not None:
        cmd += ["--haystack", str(args.haystack)]
    res = run_cmd(cmd, "llama.cpp bench")
    if args.save_ref:
        args.save_ref.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return res, None


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) and x > 0 else None


def _keysort(keys) -> list[str]:
    def k(s: str):
        try:
            return (0, int(s), s)
        except ValueError:
            return (1, 0, s)
    return sorted(set(keys), key=k)


def build_rows(ours: dict | None, ref: dict | None,
               suffix: str = "") -> list[tuple[str, float | None, float | None]]:
    """[(label, ours_tps, ref_tps)] for every prefill ctx and decode batch/ctx in either result,
    from prefill_tps/decode_tps, or with suffix "_best" from prefill_tps_best/decode_tps_best."""
    results = [r for r in (ours, ref) if r]
    rows: list[tuple[str, float | None, float | None]] = []

    def get(r: dict | None, *path: str) -> float | None:
        cur: object = r
        for p in path:
            if not isinstance(cur, dict):
                return None
            cur = cur.get(p)
        return _num(cur)

    pre, dec = "prefill_tps" + suffix, "decode_tps" + suffix
    for c in _keysort(k for r in results for k in r["prefill_tps"]):
        rows.append((f"prefill@{c}", get(ours, pre, c), get(ref, pre, c)))
    for b in _keysort(k for r in results for k in r["decode_tps"]):
        ctxs = _keysort(k for r in results for k in (r["decode_tps"].get(b) or {}))
        for c in ctxs:
            rows.append((f"decode@{b}/{c}", get(ours, dec, b, c), get(ref, dec, b, c)))
    return rows


def method(res: dict | None) -> tuple | None:
    """What a result's numbers are: (statistic, repetitions, decode steps), None if unknown."""
    meta = res.get("meta") if res else None
    if not isinstance(meta, dict) or "stat" not in meta:
        return None
    return (meta.get("stat"), meta.get("reps"), meta.get("decode_tokens"))


def method_lines(ours: dict | None, ref: dict | None) -> list[str]:
    """The statistic the table shows, and a warning when the two sides differ."""
    lines = []
    for who, res in (("ours", ours), ("llama.cpp", ref)):
        if res:
            meta = res.get("meta") if isinstance(res.get("meta"), dict) else {}
            lines.append(f"{who} tok/s: {meta.get('stat_text', 'statistic unknown (an older result)')}")
    if ours and ref and (method(ours) is None or method(ours) != method(ref)):
        lines.append(f"WARNING: the two sides were not measured alike (statistic, reps, decode steps): "
                     f"ours {method(ours)}, llama.cpp {method(ref)}")
    return lines


def format_table(ours: dict | None, ref: dict | None) -> str:
    rows = build_rows(ours, ref)
    best = {label: (o, r) for label, o, r in build_rows(ours, ref, "_best")}
    headers = ["config", "ours tok/s", "llama.cpp tok/s", RATIO_HEADER,
               "ours best", "llama.cpp best", "ratio (best)"]

    def cells(o: float | None, r: float | None) -> list[str]:
        ratio = f"{r / o:.3f}" if (o and r) else "-"
        return [f"{o:.1f}" if o else "-", f"{r:.1f}" if r else "-", ratio]

    body = []
    for label, o, r in rows:
        body.append([label] + cells(o, r) + cells(*best.get(label, (None, None))))
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = []
    for who, res in (("ours", ours), ("llama.cpp", ref)):
        if res:
            extra = "".join(f", {k}={res[k]}" for k in ("version", "isa") if k in res)
            lines.append(f"{who}: {res.get('impl', '?')}{extra}, threads={res.get('threads', '?')}")

    def fmt(cells: list[str]) -> str:
        return "  ".join(cells[i].ljust(widths[i]) if i == 0 else cells[i].rjust(widths[i])
                         for i in range(len(cells)))

    lines.extend(method_lines(ours, ref))
    lines.append(fmt(headers))
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append(fmt(row))
    lines.append("tok/s: median of the timed repetitions; best: the fastest repetition")
    lines.append("time ratio = llama.cpp tok/s / ours tok/s = our time per token / llama.cpp's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ours = get_ours(args)
        ref, why = get_ref(args)
    except CompareError as e:
        print(f"compare_llamacpp.py: error: {e}", file=sys.stderr)
        return 1
    if ref is None:
        note(f"llama.cpp reference not run: {why}; printing our numbers only")
    if ours is not None and ref is not None and ours.get("threads") != ref.get("threads"):
        note(f"WARNING: thread counts differ (ours {ours.get('threads')}, llama.cpp {ref.get('threads')})")
    if ours is None and ref is None:
        print("compare_llamacpp.py: error: nothing to compare", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ours": ours, "llama.cpp": ref}, indent=1))
    else:
        print(format_table(ours, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
