#!/usr/bin/env python3
"""Runs every panel query of the Grafana dashboards against a Prometheus
server and fails if any errors out or returns no data.
    scripts/check_dashboards.py http://127.0.0.1:9090 dashboards/grafana/*.json"""
import json
import sys
import urllib.parse
import urllib.request


def main(prometheus, files):
    failed = checked = 0
    for path in files:
        with open(path) as f:
            dashboard = json.load(f)
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": target["expr"]})
                try:
                    with urllib.request.urlopen(url, timeout=10) as r:
                        answer = json.load(r)
                    problem = None if answer["data"]["result"] else "no data"
                except Exception as e:  # HTTP 400 for a bad query, etc.
                    problem = f"error: {e}"
                checked += 1
                if problem:
                    failed += 1
                    print(f"FAIL {dashboard['uid']} / {panel['title']}: {problem}\n"
                          f"     {target['expr']}")
    print(f"{checked - failed} of {checked} panel queries returned data")
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
