#!/usr/bin/env python3
"""Measure llama.cpp's reference CPU speed (via llama-cpp-python's low-level API).

Runs llama.cpp on the same GGUF and thread count as PSA-Serve's C++ bench and
prints ONE JSON object on stdout (everything else goes to stderr):

    {"impl": "llama.cpp", "version": str, "threads": n,
     "prefill_tps": {"512": x, "2048": x, "8192": x},
     "decode_tps": {"1": {"512": x, ...}, "8": {...}, "32": {...}},
     "prefill_tps_best": {...}, "decode_tps_best": {...},
     "meta": {...}}

prefill_tps / decode_tps are the median of --reps timed repetitions, the
*_best entries the fastest repetition: the same method and statistic as
build/bench/psa_runtime_bench (see below).  "meta" is extra information
(token source, flash-attention setting, repetitions, decode steps, load
average, skipped configurations, and with --flash-attn best the per-setting
numbers); consumers may ignore it.  A configuration that was skipped or
failed is null.

Method (one fresh llama_context per (context C, batch B) configuration, created
with n_seq_max=B and, by default, kv_unified=false so every sequence owns its
own KV stream of pad256(C + R*N + 1) cells; n_ctx = B * that, n_batch =
n_ubatch = 512, type_k = type_v = f16, n_threads = n_threads_batch =
--threads, flash_attn_type = --flash-attn):

  * warm-up: once, a 512-token prefill in a throw-away context.
  * prefill: C prompt tokens are decoded into sequence 0 from an empty cache in
    chunks of 512 tokens, only the last token requesting logits.  prefill_tps =
    C / seconds.  The first configuration of each C prefills R (--reps) times
    (the cache cleared in between) and those R timings give the statistic;
    the other batch sizes prefill once, untimed for the result.
  * decode: sequence 0's KV is copied to sequences 1..B-1 with
    llama_memory_seq_cp (a full per-stream copy, applied during the next
    llama_decode), one untimed warm-up step is run, then R repetitions of N
    (--decode-tokens) timed steps continuing the same sequences, each step one
    llama_decode of a llama_batch holding one token per sequence (logits
    requested for every sequence).  decode_tps = B * N / seconds.

Prompt tokens are real text: the haystack essays (*.txt in sorted filename
order, LICENSE* excluded, joined by blank lines) tokenized without BOS; decode
steps feed the following essay tokens.  With --tokens random (or if the
haystack is unavailable and --tokens auto), uniformly random token ids from the
vocabulary (seed 0) are used instead; meta.token_source says which.

A configuration whose estimated memory (weights + KV + 0.75 GiB of buffers)
exceeds --max-mem-gib (default 16) or the currently available RAM is skipped
with a note on stderr.  On SIGINT/SIGTERM the configurations finished so far
are still printed (the rest null) and the exit status is 130.  Requires
Python 3.11, numpy and llama_cpp only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from llamacpp_bench_setup import (  # the sibling module: constants, flags, helpers
    GIB, N_BATCH, die, load_essay_text, log, median, mem_available, pad256, parse_args,
)


class Bench:
    def __init__(self, args: argparse.Namespace):
        try:
            import numpy as np
            import llama_cpp
        except ImportError as e:
            die(f"cannot import numpy/llama_cpp ({e}); run with the reference venv, e.g. "
                "/root/.cache/psa-serve/venv-ref/bin/python bench/llamacpp_bench.py")
        self.np = np
        self.lc = llama_cpp
        self.args = args
        try:
            from llama_cpp import _logger
            _logger.set_verbose(args.verbose)
        except Exception:  # pragma: no cover - logging is cosmetic
            pass
        if not args.model.is_file():
            die(f"model file not found: {args.model} (use --model)")
        lc = llama_cpp
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(args.model).encode(), mp)
        if not self.model:
            die(f"llama.cpp failed to load {args.model}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        n_layer = lc.llama_model_n_layer(self.model)
        n_head = lc.llama_model_n_head(self.model)
        n_head_kv = lc.llama_model_n_head_kv(self.model)
        n_embd = lc.llama_model_n_embd(self.model)
        self.kv_bytes_per_cell = n_layer * 2 * n_head_kv * (n_embd // n_head) * 2  # K+V, f16
        self.weight_bytes = int(lc.llama_model_size(self.model))
        try:
            cpp_ver = lc.llama_version().decode()
        except Exception:
            cpp_ver = "unknown"
        self.version = f"llama-cpp-python {lc.__version__} (llama.cpp {cpp_ver})"
        self.fa_types = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                         "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        self.fa = self.fa_types["auto" if args.flash_attn == "best" else args.flash_attn]
        self.notes: list[str] = []
        self.interrupted = False
        self._prepare_tokens()

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        n = len(data) + 16
        buf = (self.lc.llama_token * n)()
        got = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n, False, False)
        if got < 0:
            n = -got
            buf = (self.lc.llama_token * n)()
            got = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n, False, False)
            if got < 0:
                die("llama_tokenize failed on the haystack text")
        return list(buf[:got])

    def _prepare_tokens(self) -> None:
        need = max(self.args.contexts) + self.args.reps * self.args.decode_tokens + 1
        source = self.args.tokens
        ids: list[int] = []
        if source in ("auto", "haystack"):
            text = load_essay_text(self.args.haystack)
            if text is None:
                if source == "haystack":
                    die(f"no essay .txt files in {self.args.haystack} (use --haystack or --tokens random)")
                log(f"haystack {self.args.haystack} not readable; using random token ids")
            else:
                ids = self.tokenize(text)
                if len(ids) < need:
                    if source == "haystack":
                        die(f"haystack has {len(ids)} tokens, need {need}")
                    log(f"haystack has only {len(ids)} tokens (< {need}); using random token ids")
                    ids = []
        if ids:
            self.token_source = f"haystack essays ({self.args.haystack.resolve()})"
        else:
            rng = self.np.random.default_rng(0)
            ids = [int(x) for x in rng.integers(0, self.n_vocab, size=need)]
            self.token_source = "random token ids (numpy default_rng seed 0)"
        self.ids = ids
        log(f"token source: {self.token_source}")

    # -- contexts -------------------------------------------------------------
    def estimate_bytes(self, ctx_cells: int) -> int:
        return self.weight_bytes + ctx_cells * self.kv_bytes_per_cell + int(0.75 * GIB)

    def new_context(self, n_ctx: int, n_seq: int):
        lc = self.lc
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.n_seq_max = n_seq
        cp.n_threads = self.args.threads
        cp.n_threads_batch = self.args.threads
        cp.flash_attn_type = self.fa
        cp.kv_unified = self.args.kv_unified == "on"
        cp.no_perf = True
        ctx = lc.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_ctx={n_ctx}, n_seq_max={n_seq})")
        return ctx

    def decode(self, ctx, batch) -> None:
        rc = self.lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, ctx, batch, n: int) -> float:
        """Decode self.ids[:n] into sequence 0 (empty cache); return seconds."""
        t0 = time.perf_counter()
        for start in range(0, n, N_BATCH):
            m = min(N_BATCH, n - start)
            batch.n_tokens = m
            for i in range(m):
                batch.token[i] = self.ids[start + i]
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if start + i == n - 1 else 0
            self.decode(ctx, batch)
        self.lc.llama_synchronize(ctx)
        return time.perf_counter() - t0

    def run_config(self, C: int, B: int, prefill_reps: int) -> tuple[list[float] | None, list[float] | None]:
        """Return (prefill seconds for C tokens, decode seconds for N steps), one per
        repetition, for one configuration; (None, None) if it was skipped."""
        lc = self.lc
        N = self.args.decode_tokens
        R = self.args.reps
        cells_per_seq = pad256(C + R * N + 1)
        n_ctx = cells_per_seq * B
        est = self.estimate_bytes(n_ctx)
        avail = mem_available()
        why = None
        if est > self.args.max_mem_gib * GIB:
            why = f"--max-mem-gib {self.args.max_mem_gib:g}"
        elif avail is not None and est > avail:
            why = f"available RAM {avail / GIB:.1f} GiB"
        if why:
            note = f"skip C={C} B={B}: estimated {est / GIB:.2f} GiB exceeds {why}"
            log(note)
            self.notes.append(note)
            return None, None
        ctx = self.new_context(n_ctx, B)
        batch = lc.llama_batch_init(max(N_BATCH, B), 0, 1)
        try:
            mem = lc.llama_get_memory(ctx)
            t_pre = []
            for r in range(prefill_reps):
                lc.llama_memory_clear(mem, True)
                t_pre.append(self.prefill(ctx, batch, C))
                log(f"C={C} B={B}: prefill {C} tokens in {t_pre[-1]:.2f}s ({C / t_pre[-1]:.1f} tok/s), "
                    f"KV {n_ctx} cells = {n_ctx * self.kv_bytes_per_cell / GIB:.2f} GiB")
            for s in range(1, B):
                lc.llama_memory_seq_cp(mem, 0, s, -1, -1)

            def step(k: int) -> None:  # k = 0 is the warm-up step at position C
                tok = self.ids[C + k]
                batch.n_tokens = B
                for s in range(B):
                    batch.token[s] = tok
                    batch.pos[s] = C + k
                    batch.n_seq_id[s] = 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = 1
                self.decode(ctx, batch)

            step(0)  # applies the pending seq copies; untimed
            lc.llama_synchronize(ctx)
            for s in range(B):
                pmax = lc.llama_memory_seq_pos_max(mem, s)
                if pmax != C:
                    raise RuntimeError(f"sequence {s} holds positions up to {pmax}, expected {C}")
            times = []
            for r in range(R):
                t0 = time.perf_counter()
                for k in range(1 + r * N, 1 + (r + 1) * N):
                    step(k)
                lc.llama_synchronize(ctx)
                times.append(time.perf_counter() - t0)
                log(f"C={C} B={B}: decode {N} steps at positions {C + 1 + r * N}.. in {times[-1]:.2f}s "
                    f"-> {B * N / times[-1]:.1f} tok/s")
            return t_pre, times
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    def warmup(self) -> None:
        ctx = self.new_context(N_BATCH, 1)
        batch = self.lc.llama_batch_init(N_BATCH, 0, 1)
        try:
            self.prefill(ctx, batch, min(N_BATCH, len(self.ids)))
        finally:
            self.lc.llama_batch_free(batch)
            self.lc.llama_free(ctx)

    def sweep(self, fa_name: str, prefill: dict, decode: dict) -> None:
        """Run every (C, B) with flash_attn_type fa_name; fill prefill/decode in place
        with {"median": tok/s, "best": tok/s} (or None)."""
        a = self.args
        self.fa = self.fa_types[fa_name]

        def stat(n_tokens: int, seconds: list[float] | None) -> dict | None:
            if not seconds:
                return None
            return {"median": round(n_tokens / median(seconds), 2), "best": round(n_tokens / min(seconds), 2)}

        for C in a.contexts:
            pre: list[float] | None = None  # from the first configuration of C that runs
            for B in a.batches:
                t_pre, t_dec = None, None
                if not self.interrupted:
                    try:
                        t_pre, t_dec = self.run_config(C, B, a.reps if pre is None else 1)
                    except RuntimeError as e:
                        note = f"flash_attn={fa_name} C={C} B={B} failed: {e}"
                        log(note)
                        self.notes.append(note)
                    except KeyboardInterrupt:  # SIGINT/SIGTERM: report what we have
                        self.interrupted = True
                        note = (f"interrupted at flash_attn={fa_name} C={C} B={B}; "
                                "remaining configurations are null")
                        log(note)
                        self.notes.append(note)
                if pre is None and t_pre:
                    pre = t_pre
                decode[str(B)][str(C)] = stat(B * a.decode_tokens, t_dec)
            prefill[str(C)] = stat(C, pre)

    def run(self) -> dict:
        a = self.args
        loadavg = list(os.getloadavg())
        log(f"{self.version}; model {a.model}; threads {a.threads}; contexts {a.contexts}; "
            f"batches {a.batches}; decode steps {a.decode_tokens} x {a.reps}; "
            f"flash_attn {a.flash_attn}; load average {loadavg[0]:.2f}")
        self.warmup()
        modes = ["on", "off"] if a.flash_attn == "best" else [a.flash_attn]
        per_mode = {}
        for m in modes:
            log(f"sweep with flash_attn={m}")
            pre: dict[str, dict | None] = {}
            dec: dict[str, dict[str, dict | None]] = {str(b): {} for b in a.batches}
            self.sweep(m, pre, dec)
            per_mode[m] = {"prefill_tps": pre, "decode_tps": dec}

        def best(vals, key):  # the faster flash-attention setting, per statistic
            vals = [v[key] for v in vals if v is not None]
            return max(vals) if vals else None

        def table(key):
            return (
                {str(C): best((per_mode[m]["prefill_tps"][str(C)] for m in modes), key) for C in a.contexts},
                {str(B): {str(C): best((per_mode[m]["decode_tps"][str(B)][str(C)] for m in modes), key)
                          for C in a.contexts} for B in a.batches})

        prefill, decode = table("median")
        prefill_best, decode_best = table("best")
        meta = {
            "token_source": self.token_source,
            "decode_tokens": a.decode_tokens,
            "reps": a.reps,
            "warmup_prefill_tokens": N_BATCH,
            "decode_warmup_steps": 1,
            "stat": "median",
            "stat_text": (f"median of {a.reps} timed repetitions (best: the fastest) after one "
                          f"{N_BATCH}-token warm-up prefill; decode: one untimed warm-up step, then "
                          f"repetitions of {a.decode_tokens} steps continuing the same sequences"),
            "flash_attn": a.flash_attn,
            "kv_type": "f16",
            "n_batch": N_BATCH,
            "n_ubatch": N_BATCH,
            "kv_unified": a.kv_unified == "on",
            "loadavg_at_start": loadavg,
            "loadavg_at_end": list(os.getloadavg()),
            "notes": self.notes,
        }
        if a.flash_attn == "best":
            meta["per_flash_attn"] = per_mode
        return {
            "impl": "llama.cpp",
            "version": self.version,
            "threads": a.threads,
            "prefill_tps": prefill,
            "decode_tps": decode,
            "prefill_tps_best": prefill_best,
            "decode_tps_best": decode_best,
            "meta": meta,
        }

    def close(self) -> None:
        self.lc.llama_model_free(self.model)


def _sigterm(signum, frame):  # turn SIGTERM into KeyboardInterrupt for partial results
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    b = Bench(args)
    try:
        result = b.run()
    finally:
        b.close()
    print(json.dumps(result), flush=True)
    return 130 if b.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
