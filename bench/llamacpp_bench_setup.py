"""Setup for llamacpp_bench.py: its constants, command line, and small helpers
(logging, statistics, memory, prompt text). Imported by the bench only."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/root/.cache/psa-serve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_HAYSTACK = REPO_ROOT / ".." / "shared" / "eval" / "haystack"
N_BATCH = 512
GIB = 1024 ** 3


def log(msg: str) -> None:
    print(f"[llamacpp_bench] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> NoReturn:
    print(f"llamacpp_bench.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Benchmark llama.cpp (through llama-cpp-python's low-level API) prefill and "
            "batched decode throughput on a GGUF model; prints one JSON object on stdout."
        ),
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads and n_threads_batch (default: %(default)s)")
    p.add_argument("--contexts", type=int_list, default=[512, 2048, 8192],
                   help="comma-separated context lengths C, prompt tokens per sequence (default: 512,2048,8192)")
    p.add_argument("--batches", type=int_list, default=[1, 8, 32],
                   help="comma-separated decode batch sizes B, concurrent sequences (default: 1,8,32)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="timed decode steps N per configuration (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3,
                   help="timed repetitions R of each prefill and of each configuration's N decode "
                        "steps (continuing the same sequences); the median is reported, the "
                        "fastest as *_best (default: %(default)s, as psa_runtime_bench)")
    p.add_argument("--quick", action="store_true",
                   help="only context 512 and batches 1,8 (overrides --contexts/--batches)")
    p.add_argument("--haystack", type=Path, default=DEFAULT_HAYSTACK,
                   help="essay directory for prompt tokens "
                        "(default: ../shared/eval/haystack relative to the repo root)")
    p.add_argument("--tokens", choices=["auto", "haystack", "random"], default="auto",
                   help="prompt token source; auto = haystack essays if readable, else random ids (default: %(default)s)")
    p.add_argument("--flash-attn", choices=["auto", "on", "off", "best"], default="auto",
                   help="llama.cpp flash_attn_type; auto is llama.cpp's own default; best runs "
                        "the whole sweep with on and with off and reports the faster of the two "
                        "for every entry (twice the time) (default: %(default)s)")
    p.add_argument("--kv-unified", choices=["on", "off"], default="off",
                   help="llama.cpp kv_unified: off gives every sequence its own KV stream "
                        "(default: %(default)s)")
    p.add_argument("--max-mem-gib", type=float, default=16.0,
                   help="skip configurations whose estimated memory exceeds this many GiB (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log output")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.decode_tokens < 1:
        p.error("--decode-tokens must be >= 1")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.quick:
        args.contexts = [512]
        args.batches = [1, 8]
    return args


def median(xs: list[float]) -> float:
    """The median (the mean of the middle two for an even count), as psa_runtime_bench."""
    v = sorted(xs)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_essay_text(haystack: Path) -> str | None:
    if not haystack.is_dir():
        return None
    files = sorted(f for f in haystack.glob("*.txt") if not f.name.upper().startswith("LICENSE"))
    if not files:
        return None
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
