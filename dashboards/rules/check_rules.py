#!/usr/bin/env python3
"""Checks the alerting rules against the conventions they promise:
- every alert has a `severity` of critical, warning or info, a summary, a
  description and a `runbook_url` of dashboards/runbooks/<alert>.md, and that
  page exists with its four sections (Meaning, Impact, Diagnosis, Mitigation);
- the unit tests (tests/psa_serve.rules.test.yml) hold, for every alert, a
  case where it fires and one where it stays silent;
- every metric the rules and the Grafana dashboards read is one the C++ code
  exports (a string literal in router/, compute_worker/, kv_service/,
  common/), Prometheus's own `up`, or a recording rule (and, for the
  dashboards alone, the containers' memory from cAdvisor and kube-state-metrics).
    dashboards/rules/check_rules.py            (needs PyYAML)"""
import glob
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "dashboards/rules/psa_serve.rules.yml")
TESTS = os.path.join(ROOT, "dashboards/rules/tests/psa_serve.rules.test.yml")
SEVERITIES = {"critical", "warning", "info"}
SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation")
# PromQL words that look like metric names.
# Metrics of the Kubernetes monitoring stack (cAdvisor, kube-state-metrics)
# that dashboards may read next to the code's: the containers' memory.
KUBERNETES = {"container_memory_working_set_bytes", "kube_pod_container_resource_limits"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "le", "inf", "nan"}


def exported_metrics():
    names = set()
    for d in ("router", "compute_worker", "kv_service", "common"):
        for path in glob.glob(os.path.join(ROOT, d, "**", "*.*"), recursive=True):
            if path.endswith((".cc", ".h")):
                with open(path, errors="replace") as f:
                    names.update(re.findall(r'"((?:psa_|vllm:)[a-z0-9_:]+)"', f.read()))
    return names


def metric_names(expr):
    expr = re.sub(r'"[^"]*"', '""', expr)         # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)          # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)         # ranges
    expr = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", "0", expr)  # numbers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or a keyword
        found.add(word)
    return found


def main():
    problems = []
    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    rules = [r for g in groups for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = [r for r in rules if "alert" in r]
    exported = exported_metrics()

    exprs = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in rules]
    for path in sorted(glob.glob(os.path.join(ROOT, "dashboards/grafana/*.json"))):
        with open(path) as f:
            board = json.load(f)
        exprs += [(f"{board['uid']} / {p['title']}", t["expr"])
                  for p in board["panels"] for t in p.get("targets", [])]
    used = set()
    for where, expr in exprs:
        for name in metric_names(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            used.add(base)
            if name == "up" or name in recorded or name in exported or base in exported:
                continue
            if name in KUBERNETES and not where.startswith("rule "):
                continue
            problems.append(f"{where}: {name} is neither exported by the code nor recorded")

    for a in alerts:
        name = a["alert"]
        sev = a.get("labels", {}).get("severity")
        if sev not in SEVERITIES:
            problems.append(f"{name}: severity {sev!r} is not one of {sorted(SEVERITIES)}")
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key} annotation")
        want = f"dashboards/runbooks/{name}.md"
        if ann.get("runbook_url") != want:
            problems.append(f"{name}: runbook_url is {ann.get('runbook_url')!r}, not {want!r}")
        page = os.path.join(ROOT, want)
        if not os.path.exists(page):
            problems.append(f"{name}: {want} is missing")
        else:
            with open(page) as f:
                text = f.read()
            for s in SECTIONS:
                if s not in text:
                    problems.append(f"{want}: no '{s}' section")
    names = {a["alert"] for a in alerts}
    for page in glob.glob(os.path.join(ROOT, "dashboards/runbooks/Psa*.md")):
        if os.path.basename(page)[:-3] not in names:
            problems.append(f"{os.path.relpath(page, ROOT)}: no alert of that name")

    with open(TESTS) as f:
        tests = yaml.safe_load(f)["tests"]
    fires, silent = set(), set()
    for t in tests:
        for c in t.get("alert_rule_test", []):
            (fires if c.get("exp_alerts") else silent).add(c["alertname"])
    for name in sorted(names):
        if name not in fires:
            problems.append(f"{name}: no unit test where it fires")
        if name not in silent:
            problems.append(f"{name}: no unit test where it stays silent")

    for p in problems:
        print("FAIL", p)
    print(f"rules: {len(alerts)} alerts, {len(recorded)} recording rules, "
          f"{len(used)} metrics checked against the code: "
          f"{'ok' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
