#!/usr/bin/env python3
"""Record golden fixtures for a registry model from llama.cpp.

This script uses an independent implementation -- llama.cpp through its Python
binding llama-cpp-python -- to produce reference data that the PSA-Serve C++
tests (tests/integration/golden_test.cc) compare against.  The model is a name
of the model registry compute_worker/model/models.tsv (--registry-name, default
smollm2-135m); its GGUF is read from the model cache ($PSA_CACHE_DIR/models,
else ~/.cache/psa-serve/models; fetch it with scripts/fetch_model.sh NAME) and
its sha256 is checked against the registry.  It writes one JSON file,
tests/golden/<name>.json (for smollm2-135m: tests/golden/smollm2_q4_1.json, the
historical name), with this schema:

    {
      "model_sha256": str,                 # sha256 of the GGUF that was used
      "llama_cpp_python_version": str,     # llama_cpp.__version__
      "tokenize": [                        # llm.tokenize(text.encode(), add_bos=False, special=special)
        {"text": str, "special": bool, "ids": [int, ...]}, ...
      ],
      "top_logits": [                      # logits of the LAST prompt position, prompt evaluated
        {"prompt_ids": [int, ...],         # from an empty KV cache
         "top": [[id, logit], ...]}, ...   # 10 entries, logit descending (ties: lower id first)
      ],
      "greedy": [                          # argmax decoding, one token fed per step after the prompt
        {"name": str, "prompt_ids": [int, ...],
         "tokens": [64 ints],              # never stops at EOS
         "gaps": [64 floats]}, ...         # top1 logit - top2 logit at each step (near-tie detector)
      ]
    }

How the data is produced:
  * Llama(model, n_ctx=8192, n_batch=512, n_ubatch=512, n_threads=T,
    n_threads_batch=T, logits_all=False, flash_attn=False, verbose=False).
    No sampling helpers are used at all; argmax is numpy's (first index wins
    on exact ties).
  * Logits are read with llama_cpp.llama_get_logits_ith(ctx, -1).  In this
    llama-cpp-python version Llama.eval() does NOT copy logits into llm.scores
    unless logits_all=True, so llm.scores must not be used with
    logits_all=False.  The script cross-checks get_logits_ith(-1) against
    llama_get_logits() and against llm.scores of a second, logits_all=True
    instance on a short prompt, and checks that re-evaluation is bit-exact.
  * Greedy prompts: the haystack essays (*.txt in sorted filename order,
    LICENSE* files excluded) are joined with "\\n\\n" and tokenized once
    (special=False); the first 100 / 1000 / 4000 tokens are kept and the
    separately tokenized suffix "\\n\\nSummarize the text above in one
    sentence:" is appended.  prompt_ids in the JSON are the exact ids used.
  * Top-logit prompts: a ChatML question (the model family's default system
    prompt -- SmolLM2's or Qwen's, see SYSTEM_PROMPTS -- special tokens parsed), a plain English sentence, a Python code prefix and
    the first 300 tokens of the second essay in sorted order.

Progress and decoded greedy continuations are printed to stderr.
Requires Python 3.11, numpy and llama_cpp (llama-cpp-python) only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY_TSV = REPO_ROOT / "compute_worker" / "model" / "models.tsv"
DEFAULT_REGISTRY_NAME = "smollm2-135m"
DEFAULT_HAYSTACK = REPO_ROOT / ".." / "shared" / "eval" / "haystack"
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
# Output files whose name predates tests/golden/<registry name>.json; kept so
# that existing fixtures stay valid.
LEGACY_OUT_NAMES = {"smollm2-135m": "smollm2_q4_1.json"}

N_CTX = 8192
N_BATCH = 512
TOP_K = 10
GREEDY_STEPS = 64
GREEDY_LENGTHS = (100, 1000, 4000)
SUMMARY_SUFFIX = "\n\nSummarize the text above in one sentence:"
ESSAY_EXCERPT_TOKENS = 300
MAX_FIXTURE_BYTES = 200 * 1024

# Default system prompt of each model family's chat template, by registry-name
# prefix (the ChatML question of the top-logit cases uses it).
SYSTEM_PROMPTS: dict[str, str] = {
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "qwen": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}

# (text, special) pairs for the tokenizer fixtures.
TOKENIZE_CASES: list[tuple[str, bool]] = [
    ("Hello, world! This is a simple ASCII sentence.", False),
    (" leading space, trailing space ", False),
    ("Café naïve façade — résumé, jalapeño, Zürich, Ångström", False),
    ("日本語のテキストと中文字符，한국어도 있어요。", False),
    ("Emoji: 🙂🚀👍🏽 and a family 👨\u200d👩\u200d👧\u200d👦!", False),
    ("Привет, мир! Как дела? Ёжик в тумане.", False),
    ("def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
     "    return fib(n - 1) + fib(n - 2)  # O(2^n)\n", False),
    ("a  b   c    d        e", False),
    ("\tindented\t\ttabs\t", False),
    ("line1\nline2\n\nline3\n\n\n", False),
    ("  \t \n  mixed \r\n\t  whitespace  \n", False),
    ("1234567 3.14159 and 0.001, 42nd, 2024-01-31, 1e-9", False),
    ("don't I'll we've they're she's can't WON'T", False),
    ("HTTPServer parseJSON snake_case_name camelCaseName URL", False),
    ("<|im_start|>user\nhi<|im_end|>", True),
    ("<|im_start|>user\nhi<|im_end|>", False),
    ("<|endoftext|>text after eos<|im_start|>assistant\n", True),
    ("", False),
]


def log(msg: str) -> None:
    print(f"[record_golden] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> NoReturn:
    print(f"record_golden.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_registry(path: Path = REGISTRY_TSV) -> dict[str, dict[str, str]]:
    """models.tsv: tab-separated, '#' comments; name, file, sha256, bytes, package,
    version, member, parts, retrieval heads, attention, about."""
    cols = ("name", "file", "sha256", "bytes", "package", "version", "member", "parts",
            "retrieval_heads", "attention", "about")
    registry: dict[str, dict[str, str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        die(f"cannot read the model registry {path}: {e}")
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != len(cols):
            die(f"{path}:{n}: expected {len(cols)} tab-separated columns, got {len(fields)}")
        registry[fields[0]] = dict(zip(cols, fields))
    return registry


def model_cache_dir() -> Path:
    cache = os.environ.get("PSA_CACHE_DIR")
    if cache:
        return Path(cache) / "models"
    return Path.home() / ".cache" / "psa-serve" / "models"


def system_prompt_for(name: str) -> str:
    for prefix, prompt in SYSTEM_PROMPTS.items():
        if name.startswith(prefix):
            return prompt
    die(f"no default system prompt known for registry model '{name}' "
        f"(known families: {', '.join(SYSTEM_PROMPTS)}); add it to SYSTEM_PROMPTS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Record llama.cpp (llama-cpp-python) golden fixtures -- tokenization, "
            "top-10 last-position logits and 64-step greedy continuations -- for "
            "a model of the registry (compute_worker/model/models.tsv), as one "
            "JSON file for the C++ tests."
        ),
    )
    p.add_argument(
        "--registry-name",
        default=DEFAULT_REGISTRY_NAME,
        help="registry model to record (default: %(default)s); picks the GGUF in the "
        "model cache, its expected sha256 and the output tests/golden/NAME.json "
        "(smollm2-135m: tests/golden/smollm2_q4_1.json)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="GGUF model file (default: the registry file in $PSA_CACHE_DIR/models, "
        "else ~/.cache/psa-serve/models)",
    )
    p.add_argument(
        "--haystack",
        type=Path,
        default=DEFAULT_HAYSTACK,
        help="directory of essay *.txt files used for long prompts "
        "(default: ../shared/eval/haystack relative to the repo root)",
    )
    p.add_argument("--out", type=Path, default=None, help="output JSON file (default: tests/golden/NAME.json under the repo root)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads and n_threads_batch (default: %(default)s)")
    p.add_argument(
        "--allow-sha-mismatch",
        action="store_true",
        help="record even if the model's sha256 is not the registry's",
    )
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    registry = read_registry()
    entry = registry.get(args.registry_name)
    if entry is None:
        p.error(f"unknown registry model '{args.registry_name}'; known: {', '.join(registry)}")
    args.expected_sha256 = entry["sha256"]
    args.system_prompt = system_prompt_for(args.registry_name)
    if args.model is None:
        args.model = model_cache_dir() / entry["file"]
    if args.out is None:
        args.out = GOLDEN_DIR / LEGACY_OUT_NAMES.get(args.registry_name, f"{args.registry_name}.json")
    return args


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_essays(haystack: Path) -> list[tuple[str, str]]:
    if not haystack.is_dir():
        die(f"haystack directory not found: {haystack} (use --haystack)")
    files = sorted(
        f for f in haystack.glob("*.txt") if not f.name.upper().startswith("LICENSE")
    )
    if len(files) < 2:
        die(f"need at least 2 essay .txt files in {haystack}, found {len(files)}")
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


class Runner:
    """Thin wrapper around a llama_cpp.Llama used only for eval + raw logits."""

    def __init__(self, llama_cpp, np, model: Path, threads: int):
        self.llama_cpp = llama_cpp
        self.np = np
        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=N_CTX,
            n_batch=N_BATCH,
            n_ubatch=N_BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            flash_attn=False,
            seed=0,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str, special: bool) -> list[int]:
        return [int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)]

    def detok(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def last_logits(self):
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        if not ptr:
            die("llama_get_logits_ith(ctx, -1) returned NULL")
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, ids: list[int]):
        """Evaluate ids from an empty KV cache; return last-position logits."""
        if not ids:
            die("cannot evaluate an empty prompt")
        if len(ids) + GREEDY_STEPS > N_CTX:
            die(f"prompt of {len(ids)} tokens does not fit n_ctx={N_CTX}")
        self.llm.reset()  # n_tokens = 0 (eval() would also drop KV cells >= 0)
        mem = self.llama_cpp.llama_get_memory(self.llm.ctx)
        if mem is None:
            die("llama_get_memory returned NULL")
        self.llama_cpp.llama_memory_clear(mem, True)  # explicitly empty KV cache
        self.llm.eval(ids)
        return self.last_logits()

    def step(self, tok: int):
        self.llm.eval([tok])
        return self.last_logits()


def top_k(np, logits, k: int) -> list[list]:
    order = np.argsort(-logits, kind="stable")[:k]  # ties: lower id first
    return [[int(i), float(logits[i])] for i in order]


def check_logit_access(llama_cpp, np, runner: Runner, model: Path, threads: int, ids: list[int]) -> None:
    """Verify the logits-reading method on a short prompt (see module docstring)."""
    a = runner.prefill(ids)
    ptr = llama_cpp.llama_get_logits(runner.llm.ctx)
    if not ptr:
        die("llama_get_logits returned NULL")
    row0 = np.ctypeslib.as_array(ptr, shape=(runner.n_vocab,)).copy()
    b = runner.prefill(ids)  # second evaluation from empty cache
    d_row0 = float(np.max(np.abs(a - row0)))
    d_repeat = float(np.max(np.abs(a - b)))
    log(f"check: |ith(-1) - get_logits()[0]|max = {d_row0:.3g}; re-eval from empty cache diff = {d_repeat:.3g}")
    if d_row0 != 0.0:
        die("llama_get_logits_ith(-1) and llama_get_logits() row 0 disagree")
    if d_repeat != 0.0:
        die("re-evaluating the same prompt from an empty cache is not bit-exact; results are not deterministic")

    ref = llama_cpp.Llama(
        model_path=str(model), n_ctx=512, n_batch=N_BATCH, n_ubatch=N_BATCH,
        n_threads=threads, n_threads_batch=threads, logits_all=True,
        flash_attn=False, verbose=False,
    )
    ref.reset()
    ref.eval(ids)
    c = np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32)
    c_ith = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref.ctx, -1), shape=(runner.n_vocab,)).copy()
    d_scores = float(np.max(np.abs(a - c)))
    d_ith_scores = float(np.max(np.abs(c - c_ith)))
    log(f"check: logits_all=True instance: |scores[n-1] - ith(-1)|max = {d_ith_scores:.3g}, "
        f"vs logits_all=False ith(-1) = {d_scores:.3g}; argmax {int(np.argmax(a))} vs {int(np.argmax(c))}")
    if d_ith_scores != 0.0 or d_scores > 1e-3 or int(np.argmax(a)) != int(np.argmax(c)):
        die("logits from llm.scores (logits_all=True) and llama_get_logits_ith(-1) disagree")
    ref.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        die(f"model file not found: {args.model} (fetch it with "
            f"scripts/fetch_model.sh {args.registry_name}, or use --model)")
    try:
        import numpy as np
        import llama_cpp
    except ImportError as e:
        die(f"cannot import numpy/llama_cpp ({e}); run with the reference venv, e.g. "
            "/root/.cache/psa-serve/venv-ref/bin/python scripts/record_golden.py")

    t0 = time.time()
    log(f"hashing {args.model}")
    sha = sha256_file(args.model)
    if sha != args.expected_sha256:
        msg = f"model sha256 {sha} != expected {args.expected_sha256} ({args.registry_name})"
        if not args.allow_sha_mismatch:
            die(msg + " (pass --allow-sha-mismatch to record anyway)")
        log("WARNING: " + msg)
    essays = load_essays(args.haystack)
    log(f"{len(essays)} essays from {args.haystack.resolve()}: {essays[0][0]} .. {essays[-1][0]}")

    log(f"model {args.registry_name}: {args.model}")
    log(f"loading model with llama-cpp-python {llama_cpp.__version__}, n_ctx={N_CTX}, threads={args.threads}")
    r = Runner(llama_cpp, np, args.model, args.threads)

    # --- tokenization -----------------------------------------------------
    tokenize = []
    for text, special in TOKENIZE_CASES:
        ids = r.tokenize(text, special)
        tokenize.append({"text": text, "special": special, "ids": ids})
        log(f"tokenize special={special!s:5} {text[:40]!r}: {len(ids)} ids")

    # --- top logits -------------------------------------------------------
    chat = (f"<|im_start|>system\n{args.system_prompt}<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    excerpt_ids = r.tokenize(essays[1][1], special=False)[:ESSAY_EXCERPT_TOKENS]
    if len(excerpt_ids) < ESSAY_EXCERPT_TOKENS:
        die(f"essay {essays[1][0]} has fewer than {ESSAY_EXCERPT_TOKENS} tokens")
    logit_prompts = [
        ("chat question", r.tokenize(chat, special=True)),
        ("english sentence", r.tokenize("The quick brown fox jumps over the lazy dog, and then it", special=False)),
        ("code prefix", r.tokenize("import numpy as np\n\ndef softmax(x):\n    e = np.exp(x - np.max(x))\n    return", special=False)),
        (f"essay excerpt ({essays[1][0]})", excerpt_ids),
    ]
    check_logit_access(llama_cpp, np, r, args.model, args.threads, logit_prompts[0][1])

    top_logits = []
    for name, ids in logit_prompts:
        logits = r.prefill(ids)
        top = top_k(np, logits, TOP_K)
        top_logits.append({"prompt_ids": ids, "top": top})
        shown = ", ".join(f"{i}:{r.detok([i])!r}={v:.3f}" for i, v in top[:5])
        log(f"top_logits {name} ({len(ids)} tokens): {shown}")

    # --- greedy -----------------------------------------------------------
    haystack_text = "\n\n".join(text for _, text in essays)
    hay_ids = r.tokenize(haystack_text, special=False)
    suffix_ids = r.tokenize(SUMMARY_SUFFIX, special=False)
    log(f"haystack: {len(hay_ids)} tokens; suffix {SUMMARY_SUFFIX!r} = {suffix_ids}")
    greedy = []
    for n in GREEDY_LENGTHS:
        if len(hay_ids) < n:
            die(f"haystack has only {len(hay_ids)} tokens, need {n}")
        prompt = hay_ids[:n] + suffix_ids
        t1 = time.time()
        logits = r.prefill(prompt)
        tokens: list[int] = []
        gaps: list[float] = []
        for step in range(GREEDY_STEPS):
            order = np.argsort(-logits, kind="stable")[:2]
            tok = int(order[0])
            tokens.append(tok)
            gaps.append(float(logits[order[0]] - logits[order[1]]))
            if step + 1 < GREEDY_STEPS:
                logits = r.step(tok)
        name = f"essays_{n}_summarize"
        greedy.append({"name": name, "prompt_ids": prompt, "tokens": tokens, "gaps": gaps})
        near = sum(1 for g in gaps if g < 0.05)
        log(f"greedy {name}: prompt {len(prompt)} tokens, {time.time() - t1:.1f}s, "
            f"min gap {min(gaps):.4f}, {near} steps with gap < 0.05")
        log(f"  continuation: {r.detok(tokens)!r}")

    out = {
        "model_sha256": sha,
        "llama_cpp_python_version": llama_cpp.__version__,
        "tokenize": tokenize,
        "top_logits": top_logits,
        "greedy": greedy,
    }
    text = json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    size = len(text.encode("utf-8"))
    log(f"wrote {args.out} ({size} bytes) in {time.time() - t0:.1f}s")
    if size > MAX_FIXTURE_BYTES:
        log(f"WARNING: fixture is larger than {MAX_FIXTURE_BYTES} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
