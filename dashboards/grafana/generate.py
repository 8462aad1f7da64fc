#!/usr/bin/env python3
"""Writes the Grafana dashboards (psa-*.json) of this folder: the panels and
their PromQL live here, the JSON is generated. Run after editing:
    python3 dashboards/grafana/generate.py
Every query is checked against a real Prometheus scraping a live cluster by
scripts/test_dashboards.sh (ctest: dashboards.PanelsHaveData)."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(quantile, metric, by="le", window="1m"):
    return (f"histogram_quantile({quantile}, sum by ({by}) "
            f"(rate({metric}_bucket[{window}])))")


def ratio(num, den):
    return f"({num} or vector(0)) / clamp_min({den}, 1e-9)"


def dashboard(uid, title, description, panels):
    out = []
    for i, (ptitle, unit, targets) in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": ptitle, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend,
                         "datasource": DS} for k, (expr, legend) in enumerate(targets)],
        })
    return {
        "uid": uid, "title": title, "description": description, "tags": ["psa-serve"],
        "schemaVersion": 38, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus",
                                 "type": "datasource", "query": "prometheus"}]},
        "panels": out,
    }


OVERVIEW = dashboard("psa-overview", "PSA-Serve: overview",
                     "Traffic, errors, latency, throughput and saturation of the cluster.", [
    ("Requests/s by status", "reqps",
     [("sum by (code) (rate(psa_router_requests_total[1m]))", "{{code}}")]),
    # Server-side: not the clients' cancellations nor their invalid
    # requests. DEADLINE_EXCEEDED counts (workers and router record it as
    # such, not as CANCELLED).
    ("Server error ratio", "percentunit",
     [(ratio('sum(rate(psa_router_requests_total{code!~"OK|CANCELLED|INVALID_ARGUMENT"}[1m]))',
             "sum(rate(psa_router_requests_total[1m]))"), "errors")]),
    ("Deadlines exceeded and cancellations /s", "reqps",
     [('sum(rate(psa_router_requests_total{code="DEADLINE_EXCEEDED"}[5m])) or vector(0)',
       "router: deadline exceeded"),
      ('sum(rate(psa_router_requests_total{code="CANCELLED"}[5m])) or vector(0)',
       "router: cancelled by the client"),
      ('sum(rate(psa_worker_requests_total{outcome="DEADLINE_EXCEEDED"}[5m])) or vector(0)',
       "workers: deadline exceeded"),
      ('sum(rate(psa_worker_requests_total{outcome=~"cancelled|CANCELLED"}[5m])) or vector(0)',
       "workers: cancelled")]),
    ("Time to first token", "s",
     [(q(p, "psa_router_time_to_first_token_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("End-to-end latency", "s",
     [(q(p, "psa_router_e2e_request_latency_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("Inter-token latency", "s",
     [(q(p, "psa_worker_inter_token_latency_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("Tokens/s", "short",
     [("sum(rate(psa_worker_generation_tokens_total[1m]))", "generated"),
      ("sum(rate(psa_worker_prompt_tokens_total[1m]))", "prompt")]),
    ("Requests in flight", "short",
     [("sum(psa_router_requests_active)", "router active"),
      ("sum(psa_worker_requests_running)", "workers running"),
      ("sum(psa_worker_requests_waiting)", "workers waiting")]),
    ("Worker health", "short",
     [("psa_router_worker_healthy", "{{worker}}")]),
    ("Retries and resumes /s", "reqps",
     [("sum(rate(psa_router_retries_total[5m]))", "retries"),
      ("sum(rate(psa_router_resumes_total[5m]))", "resumes")]),
])

ATTENTION = dashboard("psa-attention", "PSA-Serve: sparse attention and KV reuse",
                      "What PSA reads per step, and how much KV comes from the KV service.", [
    ("Blocks read per step and head, by layer (median)", "short",
     [(q(0.5, "psa_worker_attention_blocks_selected", by="le, layer"), "layer {{layer}}")]),
    ("KV read vs dense", "percentunit",
     [(ratio("sum(rate(psa_worker_attention_kv_blocks_read_total[1m]))",
             "sum(rate(psa_worker_attention_kv_blocks_dense_total[1m]))"), "all steps"),
      (q(0.5, "psa_worker_attention_step_selected_fraction"), "median step")]),
    ("KV read per step by policy and epsilon (median step)", "percentunit",
     [(q(0.5, "psa_worker_attention_step_selected_fraction", by="le, policy, epsilon"),
       "{{policy}} {{epsilon}}")]),
    ("Progressive iterations per step (mean over heads)", "short",
     [(q(p, "psa_worker_attention_iterations"), f"p{int(p * 100)}") for p in (0.5, 0.95)]),
    ("Prefix cache hit ratio (prompt tokens)", "percentunit",
     [(ratio("sum(rate(psa_worker_prefix_cache_hits_total[5m]))",
             "sum(rate(psa_worker_prefix_cache_queries_total[5m]))"), "hits")]),
    ("KV block pool: usage and hit ratio", "percentunit",
     [("max by (instance) (psa_worker_kv_pool_usage_ratio)", "{{instance}} usage"),
      ("1 - " + ratio("sum(rate(psa_worker_kv_page_fetches_total[5m]))",
                      "sum(rate(psa_worker_kv_page_reads_total[5m]))"), "hit ratio")]),
    ("KV bytes/s between workers and the KV service", "Bps",
     [("sum(rate(psa_worker_kv_page_fetch_bytes_total[1m]))", "pages fetched by attention"),
      ("sum(rate(psa_worker_kv_fetch_bytes_total[1m]))", "prefixes loaded"),
      ("sum(rate(psa_worker_kv_write_bytes_total[1m]))", "published")]),
    ("KV fetch stall (thread-seconds waited per second)", "short",
     [("sum by (instance) (rate(psa_worker_kv_fetch_stall_seconds_total[1m]))",
       "{{instance}} attention"),
      ("sum by (instance) (rate(psa_worker_prefix_load_seconds_sum[1m]))",
       "{{instance}} prefix loads")]),
    # Failures only: publishes left out by design (queue full under load,
    # pages evicted) are counted apart, and prefix misses are not errors.
    ("KV service errors seen by workers /s", "short",
     [("sum by (op) (rate(psa_worker_kv_errors_total[5m])) or vector(0)", "{{op}}")]),
    ("KV publishes dropped by design /s (not errors)", "short",
     [("sum by (reason) (rate(psa_worker_kv_publishes_dropped_total[5m]))", "{{reason}}")]),
])

KV = dashboard("psa-kv-service", "PSA-Serve: KV service",
               "The host-memory KV block store: capacity, traffic, latency.", [
    ("Memory held vs capacity", "bytes",
     [("sum by (instance) (psa_kv_store_bytes)", "{{instance}} held"),
      ("sum by (instance) (psa_kv_store_capacity_bytes)", "{{instance}} capacity")]),
    ("Usage ratio", "percentunit",
     [("max by (instance) (psa_kv_store_usage_ratio)", "{{instance}}")]),
    ("Sequences and blocks", "short",
     [("sum(psa_kv_store_sequences)", "sequences"),
      ("sum(psa_kv_store_blocks)", "blocks referenced"),
      ("sum(psa_kv_store_unique_blocks)", "blocks held")]),
    ("Evictions/s", "short",
     [("sum(rate(psa_kv_store_evictions_total[5m]))", "evictions")]),
    ("Fetch and write bytes/s", "Bps",
     [("sum by (instance) (rate(psa_kv_fetch_bytes_total[1m]))", "{{instance}} fetched"),
      ("sum by (instance) (rate(psa_kv_write_bytes_total[1m]))", "{{instance}} written")]),
    ("RPCs/s by method and status", "reqps",
     [("sum by (method, code) (rate(psa_kv_rpcs_total[1m]))", "{{method}} {{code}}")]),
    # A prefix lookup that misses is an answer (code OK), counted here.
    ("RPC errors/s by method and code", "reqps",
     [('sum by (method, code) (rate(psa_kv_rpcs_total{code!="OK"}[5m])) or vector(0)',
       "{{method}} {{code}}")]),
    ("Prefix lookups/s by result", "reqps",
     [("sum by (result) (rate(psa_kv_lookups_total[5m]))", "{{result}}")]),
    ("RPC latency p99 by method", "s",
     [(q(0.99, "psa_kv_rpc_duration_seconds", by="le, method", window="5m"), "{{method}}")]),
    ("Open streams", "short",
     [("sum by (method) (psa_kv_active_streams)", "{{method}}")]),
])

if __name__ == "__main__":
    for d in (OVERVIEW, ATTENTION, KV):
        with open(os.path.join(HERE, d["uid"] + ".json"), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
        print("wrote", d["uid"] + ".json")
