#!/usr/bin/env python3
"""Tokens/s through the router's OpenAI HTTP API (the `openai` package,
streaming) against its gRPC API (the Python SDK, streaming), the same
requests side by side, at several numbers of concurrent streams.

    bench/http_vs_grpc.py --http http://127.0.0.1:8000 --grpc 127.0.0.1:7000 \
        --streams 1,64 --tokens 32 [--api-key KEY]

Each stream asks for --tokens tokens (ignore_eos, greedy, dense attention,
a distinct prompt per stream); a round runs all streams at once, gRPC then
HTTP, repeated --rounds times; the best round of each is reported with the
ratio HTTP / gRPC. With --router-pid, also the router's CPU time per 1000
tokens on each path (/proc): the front door's own cost, which the tokens/s
of a worker-bound cluster hide. Needs a running cluster
(deploy/local/cluster.sh start; the router's pid is in .cluster/router.pid).
"""
import argparse
import concurrent.futures as cf
import os
import time

import openai

import psa_serve


def grpc_stream(target, i, tokens, key):
    with psa_serve.Client(target, api_key=key or None) as c:
        n = 0
        for chunk in c.generate(f"Stream {i}: tell a story about the number {i}.",
                                max_tokens=tokens, attention="dense", ignore_eos=True):
            n += len(chunk.token_ids)
        return n


def http_stream(client, model, i, tokens):
    n = 0
    stream = client.completions.create(
        model=model, prompt=f"Stream {i}: tell a story about the number {i}.", max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"attention": "dense", "ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return n


def cpu_seconds(pid):
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_round(fn, streams, pid):
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=streams) as pool:
        tokens = sum(pool.map(fn, range(streams)))
    return tokens / (time.perf_counter() - start), (cpu_seconds(pid) - cpu) * 1000 / tokens * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--streams", default="1,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--api-key", default="")
    ap.add_argument("--router-pid", type=int, default=0)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.http + "/v1", api_key=a.api_key or "unused",
                           max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    print("streams  grpc_tok_s  http_tok_s  http/grpc  router_cpu_ms_per_1k_tok(grpc, http)")
    for streams in [int(s) for s in a.streams.split(",")]:
        g = h = 0.0
        gc, hc = [], []
        for _ in range(a.rounds):
            tps, cpu = run_round(lambda i: grpc_stream(a.grpc, i, a.tokens, a.api_key), streams,
                                 a.router_pid)
            g, gc = max(g, tps), gc + [cpu]
            tps, cpu = run_round(lambda i: http_stream(client, model, i, a.tokens), streams,
                                 a.router_pid)
            h, hc = max(h, tps), hc + [cpu]
        cpu = f"  {min(gc):8.1f} {min(hc):8.1f}" if a.router_pid else ""
        print(f"{streams:7d}  {g:10.1f}  {h:10.1f}  {h / g:9.3f}{cpu}", flush=True)


if __name__ == "__main__":
    main()
