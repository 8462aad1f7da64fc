#!/usr/bin/env python3
"""Writes the Grafana dashboards (psa-*.json) of this folder: the panels and
their PromQL live here, the JSON is generated. Run after editing:
    python3 dashboards/grafana/generate.py
Every query is checked against a real Prometheus scraping a live cluster by
scripts/test_dashboards.sh (ctest: dashboards.PanelsHaveData)."""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's window for rate(): at least four scrape intervals, so a panel
# never goes blank at a short range or a long scrape interval.
W = "$__rate_interval"
# Every series of a PSA process carries the namespace and pod of its target
# (the ServiceMonitors give them); the variables below pick them. Their "All"
# is the regex .*, which also matches an absent label: the local cluster's
# static targets have neither, and every panel still shows them.
SCOPE = 'namespace=~"$namespace", pod=~"$pod"'
# Only in Kubernetes: cAdvisor's and kube-state-metrics' series of the PSA pods
# (those with a target up in a psa-* job). scripts/check_dashboards.py runs
# these queries against the local cluster too, but accepts no data there.
PSA_PODS = 'and on (namespace, pod) up{job=~"psa-.*", %s}' % SCOPE
MEMORY = 'container_memory_working_set_bytes{%s, container!="", container!="POD"}' % SCOPE
LIMIT = 'kube_pod_container_resource_limits{%s, resource="memory"}' % SCOPE
TTFT = "psa_router_time_to_first_token_seconds"
SERVER_ERROR = 'code!~"OK|CANCELLED|INVALID_ARGUMENT"'


def scope(expr):
    """Adds the namespace and pod matchers to every PSA metric of expr."""
    def add(m):
        matchers = m.group(2)
        if matchers is None:
            return f"{m.group(1)}{{{SCOPE}}}"
        inner = matchers[1:-1].strip()
        return f"{m.group(1)}{{{SCOPE}{', ' + inner if inner else ''}}}"
    return re.sub(r'(?<![\w:])((?:psa_|vllm:)[a-zA-Z0-9_:]*)(\{[^}]*\})?', add, expr)


def q(quantile, metric, by="le", window=W):
    return (f"histogram_quantile({quantile}, sum by ({by}) "
            f"(rate({metric}_bucket[{window}])))")


def ratio(num, den):
    return f"({num} or vector(0)) / clamp_min({den}, 1e-9)"


def variable(name, label, query):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
            "refresh": 2, "sort": 1, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def panel(title, unit, targets, kind="timeseries", w=12, h=8, description=None,
          thresholds=None):
    return {"title": title, "unit": unit, "targets": targets, "kind": kind, "w": w, "h": h,
            "description": description, "thresholds": thresholds}


def stat(title, unit, expr, description, thresholds):
    """A single number over the dashboard's time range ($__range)."""
    return panel(title, unit, [(expr, title)], kind="stat", w=6, h=5,
                 description=description, thresholds=thresholds)


def dashboard(uid, title, description, panels):
    out = []
    x = y = row_h = 0
    for i, p in enumerate(panels):
        if isinstance(p, tuple):
            p = panel(*p)
        if x + p["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        item = {
            "id": i + 1, "type": p["kind"], "title": p["title"], "datasource": DS,
            "gridPos": {"h": p["h"], "w": p["w"], "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "expr": scope(expr),
                         "legendFormat": legend, "datasource": DS,
                         **({"instant": True, "range": False} if p["kind"] == "stat" else {})}
                        for k, (expr, legend) in enumerate(p["targets"])],
        }
        if p["description"]:
            item["description"] = p["description"]
        if p["thresholds"]:
            item["fieldConfig"]["defaults"]["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": c, "value": v} for c, v in p["thresholds"]]}
        if p["kind"] == "stat":
            item["fieldConfig"]["defaults"]["decimals"] = 2
            item["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                 "values": False},
                               "colorMode": "background", "graphMode": "none",
                               "textMode": "value"}
        out.append(item)
        x, row_h = x + p["w"], max(row_h, p["h"])
    return {
        "uid": uid, "title": title, "description": description, "tags": ["psa-serve"],
        "schemaVersion": 38, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus"},
            variable("namespace", "Namespace", 'label_values(up{job=~"psa-.*"}, namespace)'),
            variable("pod", "Pod",
                     'label_values(up{job=~"psa-.*", namespace=~"$namespace"}, pod)'),
        ]},
        "panels": out,
    }


OVERVIEW = dashboard("psa-overview", "PSA-Serve: overview",
                     "Traffic, errors, latency, throughput and saturation of the cluster.", [
    # The objectives of the alerts (dashboards/rules), over the time range
    # shown. 2.048 s is the histogram bucket the alerts read as 2 s. No
    # request in the range: no data, not 0% nor 100%.
    stat("First tokens within 2 s (time range)", "percentunit",
         f'sum(increase({TTFT}_bucket{{le="2.048"}}[$__range]))'
         f" / (sum(increase({TTFT}_count[$__range])) > 0)",
         "Share of generations whose first token reached the client within 2 s (bucket "
         "le=2.048) over the dashboard's time range. Objective: 99%.",
         [("red", None), ("orange", 0.95), ("green", 0.99)]),
    stat("Requests (time range)", "short",
         "sum(increase(psa_router_requests_total[$__range]))",
         "Generations finished by the routers over the dashboard's time range.",
         [("blue", None)]),
    stat("Server errors (time range)", "percentunit",
         'sum(increase(psa_router_requests_total{code!~"OK|CANCELLED|INVALID_ARGUMENT"}'
         "[$__range])) / (sum(increase(psa_router_requests_total[$__range])) > 0)",
         "Share of generations that failed on the server side (not OK, not cancelled by the "
         "client, not invalid) over the dashboard's time range; the alert "
         "PsaRouterErrorRatioHigh fires above 5% over 5 minutes.",
         [("green", None), ("orange", 0.01), ("red", 0.05)]),
    stat("Router queue now", "short", "sum(psa_router_requests_queued)",
         "Generations admitted by the routers and waiting for a relay slot.",
         [("green", None), ("orange", 1)]),
    ("Requests/s by status", "reqps",
     [("sum by (code) (rate(psa_router_requests_total[$__rate_interval]))", "{{code}}")]),
    # Server-side: not the clients' cancellations nor their invalid
    # requests. DEADLINE_EXCEEDED counts (workers and router record it as
    # such, not as CANCELLED).
    ("Server error ratio", "percentunit",
     [(ratio(f'sum(rate(psa_router_requests_total{{{SERVER_ERROR}}}[{W}]))',
             "sum(rate(psa_router_requests_total[$__rate_interval]))"), "errors")]),
    ("Deadlines exceeded and cancellations /s", "reqps",
     [('sum(rate(psa_router_requests_total{code="DEADLINE_EXCEEDED"}[$__rate_interval])) or vector(0)',
       "router: deadline exceeded"),
      ('sum(rate(psa_router_requests_total{code="CANCELLED"}[$__rate_interval])) or vector(0)',
       "router: cancelled by the client"),
      ('sum(rate(psa_worker_requests_total{outcome="DEADLINE_EXCEEDED"}[$__rate_interval])) or vector(0)',
       "workers: deadline exceeded"),
      ('sum(rate(psa_worker_requests_total{outcome=~"cancelled|CANCELLED"}[$__rate_interval])) or vector(0)',
       "workers: cancelled")]),
    # Finish reasons (stop, length, ...) and error codes, as the workers
    # record them.
    ("Worker outcomes/s", "reqps",
     [(f"sum by (outcome) (rate(psa_worker_requests_total[{W}]))", "{{outcome}}")]),
    ("Time to first token", "s",
     [(q(p, "psa_router_time_to_first_token_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("End-to-end latency", "s",
     [(q(p, "psa_router_e2e_request_latency_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("Inter-token latency", "s",
     [(q(p, "psa_worker_inter_token_latency_seconds"), f"p{int(p * 100)}")
      for p in (0.5, 0.95, 0.99)]),
    ("Tokens/s", "suffix: tok/s",
     [("sum(rate(psa_worker_generation_tokens_total[$__rate_interval]))", "generated"),
      ("sum(rate(psa_worker_prompt_tokens_total[$__rate_interval]))", "prompt")]),
    ("Requests in flight", "short",
     [("sum(psa_router_requests_active)", "router active"),
      ("sum(psa_router_requests_queued)", "router queued"),
      ("sum(psa_worker_requests_running)", "workers running"),
      ("sum(psa_worker_requests_waiting)", "workers waiting")]),
    ("Worker health (per router)", "bool_yes_no",
     [("psa_router_worker_healthy", "{{worker}}")]),
    ("Retries and resumes /s", "reqps",
     [("sum(rate(psa_router_retries_total[$__rate_interval]))", "retries"),
      ("sum(rate(psa_router_resumes_total[$__rate_interval]))", "resumes")]),
    # Kubernetes only: cAdvisor and kube-state-metrics (kube-prometheus-stack
    # scrapes both); the PSA processes export no memory metric of their own.
    panel("Memory: working set vs limit, by pod", "bytes",
          [(f"sum by (namespace, pod) ({MEMORY} {PSA_PODS})", "{{pod}} working set"),
           (f"sum by (namespace, pod) ({LIMIT} {PSA_PODS})", "{{pod}} limit")],
          description="Kubernetes only (cAdvisor, kube-state-metrics): the container's "
                      "working set, which the OOM killer compares with the memory limit."),
    panel("Memory used of the limit, by pod", "percentunit",
          [(f"sum by (namespace, pod) ({MEMORY} {PSA_PODS})"
            f" / sum by (namespace, pod) ({LIMIT} {PSA_PODS})", "{{pod}}")],
          description="Kubernetes only: working set over the memory limit; at 100% the "
                      "container is OOM-killed.",
          thresholds=[("green", None), ("orange", 0.8), ("red", 0.95)]),
])

ATTENTION = dashboard("psa-attention", "PSA-Serve: sparse attention and KV reuse",
                      "What PSA reads per step, and how much KV comes from the KV service.", [
    ("Blocks read per step and head, by layer (median)", "short",
     [(q(0.5, "psa_worker_attention_blocks_selected", by="le, layer"), "layer {{layer}}")]),
    ("KV read vs dense", "percentunit",
     [(ratio("sum(rate(psa_worker_attention_kv_blocks_read_total[$__rate_interval]))",
             "sum(rate(psa_worker_attention_kv_blocks_dense_total[$__rate_interval]))"), "all steps"),
      (q(0.5, "psa_worker_attention_step_selected_fraction"), "median step")]),
    ("KV read per step by policy and epsilon (median step)", "percentunit",
     [(q(0.5, "psa_worker_attention_step_selected_fraction", by="le, policy, epsilon"),
       "{{policy}} {{epsilon}}")]),
    ("Progressive iterations per step (mean over heads)", "short",
     [(q(p, "psa_worker_attention_iterations"), f"p{int(p * 100)}") for p in (0.5, 0.95)]),
    ("Prefix cache hit ratio (prompt tokens)", "percentunit",
     [(ratio("sum(rate(psa_worker_prefix_cache_hits_total[$__rate_interval]))",
             "sum(rate(psa_worker_prefix_cache_queries_total[$__rate_interval]))"), "hits")]),
    ("KV block pool: usage and hit ratio", "percentunit",
     [("max by (instance) (psa_worker_kv_pool_usage_ratio)", "{{instance}} usage"),
      ("1 - " + ratio("sum(rate(psa_worker_kv_page_fetches_total[$__rate_interval]))",
                      "sum(rate(psa_worker_kv_page_reads_total[$__rate_interval]))"), "hit ratio")]),
    ("KV bytes/s between workers and the KV service", "Bps",
     [("sum(rate(psa_worker_kv_page_fetch_bytes_total[$__rate_interval]))", "pages fetched by attention"),
      ("sum(rate(psa_worker_kv_fetch_bytes_total[$__rate_interval]))", "prefixes loaded"),
      ("sum(rate(psa_worker_kv_write_bytes_total[$__rate_interval]))", "published")]),
    ("KV fetch stall (thread-seconds waited per second)", "short",
     [("sum by (instance) (rate(psa_worker_kv_fetch_stall_seconds_total[$__rate_interval]))",
       "{{instance}} attention"),
      ("sum by (instance) (rate(psa_worker_prefix_load_seconds_sum[$__rate_interval]))",
       "{{instance}} prefix loads")]),
    # Failures only: publishes left out by design (queue full under load,
    # pages evicted) are counted apart, and prefix misses are not errors.
    ("KV service errors seen by workers /s, by op", "ops",
     [("sum by (op) (rate(psa_worker_kv_errors_total[$__rate_interval])) or vector(0)", "{{op}}")]),
    ("KV publishes dropped by design /s (not errors)", "ops",
     [("sum by (reason) (rate(psa_worker_kv_publishes_dropped_total[$__rate_interval]))",
       "{{reason}}")]),
    ("KV block pool pages: pinned and overflow", "short",
     [("sum by (instance) (psa_worker_kv_pool_pinned_pages)", "{{instance}} pinned"),
      ("sum by (instance) (psa_worker_kv_pool_overflow_pages)", "{{instance}} overflow")]),
    # The KV service could not return blocks a sequence needed, so the worker
    # recomputed its KV from the tokens.
    ("Sequence rebuilds/s", "ops",
     [(f"sum by (instance) (rate(psa_worker_sequence_rebuilds_total[{W}]))", "{{instance}}")]),
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
    ("Evictions/s", "ops",
     [("sum(rate(psa_kv_store_evictions_total[$__rate_interval]))", "evictions")]),
    ("Fetch and write bytes/s", "Bps",
     [("sum by (instance) (rate(psa_kv_fetch_bytes_total[$__rate_interval]))", "{{instance}} fetched"),
      ("sum by (instance) (rate(psa_kv_write_bytes_total[$__rate_interval]))", "{{instance}} written")]),
    ("RPCs/s by method and status", "reqps",
     [("sum by (method, code) (rate(psa_kv_rpcs_total[$__rate_interval]))", "{{method}} {{code}}")]),
    # A prefix lookup that misses is an answer (code OK), counted here.
    ("RPC errors/s by method and code", "reqps",
     [('sum by (method, code) (rate(psa_kv_rpcs_total{code!="OK"}[$__rate_interval])) or vector(0)',
       "{{method}} {{code}}")]),
    ("Prefix lookups/s by result", "reqps",
     [("sum by (result) (rate(psa_kv_lookups_total[$__rate_interval]))", "{{result}}")]),
    ("RPC latency p99 by method", "s",
     [(q(0.99, "psa_kv_rpc_duration_seconds", by="le, method"), "{{method}}")]),
    ("Open streams", "short",
     [("sum by (method) (psa_kv_active_streams)", "{{method}}")]),
])

if __name__ == "__main__":
    for d in (OVERVIEW, ATTENTION, KV):
        with open(os.path.join(HERE, d["uid"] + ".json"), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
        print("wrote", d["uid"] + ".json")
