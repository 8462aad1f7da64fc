#!/usr/bin/env python3
"""Checks a rendered overlay (kubectl kustomize) for what the schemas cannot
see: the wiring the README promises. Run by scripts/test_deploy.sh:
    deploy/k8s/check_rendered.py RENDERED.yaml [--release=LABEL] [--kv-shards=N]
- workers: --threads from the CPU request (Downward API); no `replicas` (a
  KEDA ScaledObject on the queue gauge owns the count, and no HPA competes);
  the model on a PersistentVolumeClaim fetched only if absent; the KV shard
  list built from the StatefulSet's replica count (the start script is run
  here, after kubelet-style $(VAR) expansion, with a stand-in binary);
- every server container: every file a flag names (--*_file=) on a mounted
  volume; with TLS no gRPC probe (kubelet's cannot speak TLS); startup,
  readiness and liveness probes with
  explicit timeouts, liveness apart from readiness, and --shutdown_grace_ms
  within the pod's terminationGracePeriodSeconds (at least half of it, 5 s
  left to exit);
- placement: KV shards spread over nodes (DoNotSchedule), routers spread or
  anti-affine; a headless Service in front of the routers;
- monitoring: ServiceMonitors and the PrometheusRule carry the `release`
  label (--release), each ServiceMonitor selects a Service with its port;
  the PrometheusRule holds dashboards/rules/psa_serve.rules.yml's groups and
  one ConfigMap per dashboard holds its JSON. Needs PyYAML."""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
problems = []


def check(cond, message):
    if not cond:
        problems.append(message)
    return cond


def kubelet_expand(s, env):
    """$(VAR) -> value for defined VARs, $$ -> $, anything else kept (as the
    kubelet expands command and args)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "$" and i + 1 < len(s):
            if s[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if s[i + 1] == "(":
                j = s.find(")", i + 2)
                if j > 0:
                    name = s[i + 2:j]
                    out.append(env[name] if name in env else s[i:j + 1])
                    i = j + 1
                    continue
        out.append(s[i])
        i += 1
    return "".join(out)


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--release", default="kube-prometheus-stack")
    ap.add_argument("--kv-shards", type=int, default=None)
    args = ap.parse_args()
    with open(args.rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    by = {}
    for o in objs:
        by.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    deps = {**by.get("Deployment", {}), **by.get("StatefulSet", {})}
    kv = by["StatefulSet"]["psa-kv"]
    worker = by["Deployment"]["psa-worker"]
    router = by["Deployment"]["psa-router"]

    # Every server container: probes, shutdown grace.
    for name, d in deps.items():
        spec = d["spec"]["template"]["spec"]
        grace_s = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            where = f"{d['kind']} {name}, container {c['name']}"
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                if check(p in c, f"{where}: no {p}"):
                    check("timeoutSeconds" in c[p], f"{where}: {p} has no explicit timeoutSeconds")
            if "livenessProbe" in c and "readinessProbe" in c:
                live = {k: v for k, v in c["livenessProbe"].items() if k in ("grpc", "httpGet", "tcpSocket", "exec")}
                ready = {k: v for k, v in c["readinessProbe"].items() if k in ("grpc", "httpGet", "tcpSocket", "exec")}
                check(live != ready, f"{where}: liveness is the same check as readiness")
            # Files named by flags (secrets, keys, certificates) are mounted.
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            for a in c.get("args", []):
                m = re.match(r"--\w+_file=(/\S+)", a)
                if m:
                    check(any(m.group(1).startswith(p.rstrip("/") + "/") for p in mounts),
                          f"{where}: {a} is on no mounted volume")
            # kubelet's gRPC probe cannot speak TLS.
            if flag(c.get("args", []), "tls_cert_file") is not None:
                for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                    check("grpc" not in c.get(p, {}), f"{where}: TLS on, but {p} is a gRPC probe")
            ms = flag(c.get("args", []), "shutdown_grace_ms")
            if check(ms is not None, f"{where}: no --shutdown_grace_ms"):
                ms = int(ms)
                check(grace_s * 500 <= ms <= grace_s * 1000 - 5000,
                      f"{where}: --shutdown_grace_ms={ms} does not match "
                      f"terminationGracePeriodSeconds={grace_s} (half of it up to 5 s less)")

    # Workers: threads, replicas, model volume, shard list.
    wspec = worker["spec"]["template"]["spec"]
    wc = next(c for c in wspec["containers"] if c["name"] == "worker")
    env = {e["name"]: e for e in wc.get("env", [])}
    check(flag(wc["args"], "threads") == "$(PSA_THREADS)", "worker: no --threads=$(PSA_THREADS)")
    ref = env.get("PSA_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef", {})
    check(ref.get("resource") in ("requests.cpu", "limits.cpu") and ref.get("containerName") == "worker",
          "worker: PSA_THREADS is not the container's CPU (Downward API resourceFieldRef)")
    check("cpu" in wc.get("resources", {}).get("requests", {}), "worker: no CPU request for --threads")
    check("replicas" not in worker["spec"], "worker Deployment sets replicas (the ScaledObject owns them)")
    scaled = [s for s in by.get("ScaledObject", {}).values()
              if s["spec"]["scaleTargetRef"]["name"] == "psa-worker"]
    if check(len(scaled) == 1, "worker: not exactly one ScaledObject scales psa-worker"):
        trig = scaled[0]["spec"]["triggers"]
        check(any(t["type"] == "prometheus" and re.search(
            r"psa_worker_requests_waiting|vllm:num_requests_waiting", t["metadata"]["query"])
            and t["metadata"].get("threshold") for t in trig),
            "worker ScaledObject: no prometheus trigger on the waiting-requests gauge")
    check(not [h for h in by.get("HorizontalPodAutoscaler", {}).values()
               if h["spec"]["scaleTargetRef"]["name"] == "psa-worker"],
          "worker: an HPA competes with KEDA's")
    vols = {v["name"]: v for v in wspec.get("volumes", [])}
    claim = vols.get("models", {}).get("persistentVolumeClaim", {}).get("claimName")
    if check(claim, "worker: the models volume is not a PersistentVolumeClaim"):
        check(claim in by.get("PersistentVolumeClaim", {}), f"worker: PVC {claim} is not rendered")
    init = " ".join(str(a) for c in wspec.get("initContainers", []) for a in c.get("args", []) + c.get("command", []))
    check(re.search(r'if \[ -f "?/models/\$MODEL_FILE"? \]; then .*exit 0', init),
          "worker: the model fetch does not skip a model already there")

    replicas = kv["spec"]["replicas"]
    if args.kv_shards is not None:
        check(replicas == args.kv_shards, f"psa-kv has {replicas} replicas, expected {args.kv_shards}")
    count = env.get("KV_SHARD_COUNT", {}).get("value")
    check(count == str(replicas), f"worker KV_SHARD_COUNT {count!r} != psa-kv replicas {replicas}")
    check(flag(wc["args"], "kv_shards") is None, "worker: a --kv_shards list written by hand")
    values = {k: e.get("value", f"<{k}>") for k, e in env.items()}
    values["PSA_THREADS"] = "8"
    cmd = [kubelet_expand(a, values) for a in wc.get("command", [])]
    argv = [kubelet_expand(a, values) for a in wc["args"]]
    if check(cmd[:2] == ["/bin/sh", "-c"] and len(cmd) == 4, "worker: command is not /bin/sh -c SCRIPT NAME"):
        script = cmd[2].replace("exec /usr/local/bin/psa-worker", "exec echo")
        out = subprocess.run(["/bin/sh", "-c", script, cmd[3], *argv], capture_output=True, text=True,
                             env={"KV_SHARD_COUNT": str(count), "PATH": "/usr/bin:/bin"}).stdout.split()
        want = ",".join(f"psa-kv-{i}.{kv['spec']['serviceName']}:7100" for i in range(replicas))
        check(out and out[0] == f"--kv_shards={want}", f"worker start script: got {out[:1]}, want --kv_shards={want}")
        check(out[1:] == argv, "worker start script: does not pass the args on unchanged")
        check("--threads=8" in out, "worker start script: --threads not expanded")

    # Placement and Services.
    spread = kv["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    check(any(s["topologyKey"] == "kubernetes.io/hostname" and s["whenUnsatisfiable"] == "DoNotSchedule"
              for s in spread), "psa-kv: shards are not spread over nodes")
    rspec = router["spec"]["template"]["spec"]
    check(rspec.get("topologySpreadConstraints") or rspec.get("affinity", {}).get("podAntiAffinity"),
          "psa-router: no spread or anti-affinity")
    headless = [s for s in by["Service"].values() if s["spec"].get("clusterIP") == "None"
                and s["spec"]["selector"].get("app.kubernetes.io/name") == "psa-router"]
    check(headless, "psa-router: no headless Service")

    # Monitoring.
    services = by["Service"].values()
    for name, sm in by.get("ServiceMonitor", {}).items():
        check(sm["metadata"].get("labels", {}).get("release") == args.release,
              f"ServiceMonitor {name}: label release is not {args.release!r}")
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
        check(len(matched) == 1, f"ServiceMonitor {name} selects {len(matched)} Services, not 1")
        for s in matched:
            ports = {p["name"] for p in s["spec"]["ports"]}
            for e in sm["spec"]["endpoints"]:
                check(e["port"] in ports, f"ServiceMonitor {name}: Service has no port {e['port']}")
    rules = by.get("PrometheusRule", {})
    if check(len(rules) == 1, "not exactly one PrometheusRule"):
        pr = next(iter(rules.values()))
        check(pr["metadata"].get("labels", {}).get("release") == args.release,
              f"PrometheusRule: label release is not {args.release!r}")
        with open(os.path.join(ROOT, "dashboards/rules/psa_serve.rules.yml")) as f:
            source = yaml.safe_load(f)["groups"]
        strip = lambda gs: json.loads(json.dumps(gs).replace('\\n"', '"'))
        got = strip(pr["spec"]["groups"])
        for g in got:  # runbook_url may carry a base URL
            for r in g["rules"]:
                if "runbook_url" in r.get("annotations", {}):
                    r["annotations"]["runbook_url"] = "dashboards/runbooks/" + os.path.basename(
                        r["annotations"]["runbook_url"])
        check(got == strip(source), "PrometheusRule differs from dashboards/rules/psa_serve.rules.yml")
    boards = {}
    for cm in by.get("ConfigMap", {}).values():
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            boards.update({k: json.loads(v) for k, v in cm["data"].items()})
    for path in glob.glob(os.path.join(ROOT, "dashboards/grafana/*.json")):
        with open(path) as f:
            check(boards.get(os.path.basename(path)) == json.load(f),
                  f"no dashboard ConfigMap holds {os.path.basename(path)} as it is")

    for p in problems:
        print(f"FAIL {args.rendered}: {p}")
    print(f"{os.path.basename(args.rendered)}: {len(objs)} objects, "
          f"{'wiring ok' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
