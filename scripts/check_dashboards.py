#!/usr/bin/env python3
"""Runs every panel query of the Grafana dashboards against a Prometheus
server and fails if any errors out or returns no data.
    scripts/check_dashboards.py http://127.0.0.1:9090 dashboards/grafana/*.json
Grafana's variables are given the values of a local cluster: $namespace and
$pod their "All" (.*, which matches the absent labels of static targets),
$__rate_interval 1m, $__range 1h. The label_values() queries of the template
variables must return series too. Queries reading Kubernetes-only metrics
(cAdvisor, kube-state-metrics: KUBERNETES_ONLY) must run without error, but
may return nothing here; they are counted apart, not as passing."""
import json
import re
import sys
import urllib.parse
import urllib.request

VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$pod": ".*"}
KUBERNETES_ONLY = ("container_memory_working_set_bytes", "kube_pod_container_resource_limits")


def run(prometheus, expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


def main(prometheus, files):
    failed = checked = k8s_only = 0
    for path in files:
        with open(path) as f:
            dashboard = json.load(f)
        queries = []
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
                queries.append((f"variable ${var['name']}", m.group(1) if m else None))
        queries += [(panel["title"], t["expr"])
                    for panel in dashboard["panels"] for t in panel["targets"]]
        for where, expr in queries:
            checked += 1
            if expr is None:
                failed += 1
                print(f"FAIL {dashboard['uid']} / {where}: not a label_values() query")
                continue
            try:
                problem = None if run(prometheus, expr) else "no data"
            except Exception as e:  # HTTP 400 for a bad query, etc.
                problem = f"error: {e}"
            if problem == "no data" and any(m in expr for m in KUBERNETES_ONLY):
                k8s_only += 1
                print(f"skip {dashboard['uid']} / {where}: Kubernetes-only metrics, no data "
                      "in a local cluster (the query ran without error)")
                continue
            if problem:
                failed += 1
                print(f"FAIL {dashboard['uid']} / {where}: {problem}\n     {expr}")
    print(f"{checked - failed - k8s_only} of {checked} dashboard queries returned data"
          f" ({k8s_only} Kubernetes-only queries ran without data, {failed} failed)")
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
