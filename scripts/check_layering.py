#!/usr/bin/env python3
"""Fails when a project #include points from a lower room to a higher one.

Each folder ("room") may include only itself and the rooms listed for it
below; a room not listed (tests/, bench/, fuzz targets) may include anything.
Run by ctest (tests "layering" and "layering_self_test"); by hand:
scripts/check_layering.py [ROOT], or --self-test to see it catch a bad include.
"""
import pathlib
import re
import sys
import tempfile

# room -> rooms it may include (besides itself). Lower rooms first.
ALLOWED = {
    "common": [],
    "proto": [],
    "api": ["common", "proto"],
    "compute_worker/model": ["common"],
    "compute_worker/kernels": ["compute_worker/model", "common"],
    "compute_worker/kv": ["compute_worker/kernels", "compute_worker/model", "common"],
    "compute_worker/attention": ["compute_worker/kv", "compute_worker/kernels",
                                 "compute_worker/model", "common"],
    # CUDA (nvcc) rooms: the CPU rooms they sit in may not include them.
    "compute_worker/kernels/cuda": ["compute_worker/kernels", "compute_worker/model", "common"],
    "compute_worker/attention/cuda": ["compute_worker/attention", "compute_worker/kernels/cuda",
                                      "compute_worker/kv", "compute_worker/kernels",
                                      "compute_worker/model", "common"],
    "compute_worker/runtime": ["compute_worker/attention", "compute_worker/kv",
                               "compute_worker/kernels", "compute_worker/model", "common"],
    "kv_service": ["common", "proto"],
    "compute_worker/server": ["compute_worker/runtime", "compute_worker/attention",
                              "compute_worker/kv", "compute_worker/kernels",
                              "compute_worker/model", "kv_service", "api", "common", "proto"],
    "compute_worker/tools": ["compute_worker/runtime", "compute_worker/attention",
                             "compute_worker/kv", "compute_worker/kernels",
                             "compute_worker/model", "common"],
    "client": ["api", "common", "proto"],
    "router": ["api", "common", "proto"],
}
ROOMS = sorted(ALLOWED, key=len, reverse=True)  # longest prefix first
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def room_of(path: str):
    for room in ROOMS:
        if path == room or path.startswith(room + "/"):
            return room
    return None


def check(root: pathlib.Path) -> list:
    errors, checked = [], 0
    for f in sorted(root.rglob("*")):
        if f.suffix not in (".h", ".cc", ".cu", ".cuh") or not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("build", ".")):
            continue
        src = room_of(rel)
        if src is None:
            continue
        checked += 1
        for m in INCLUDE.finditer(f.read_text(errors="replace")):
            dst = room_of(m.group(1))
            if dst is None or dst == src or dst in ALLOWED[src]:
                continue
            line = f.read_text(errors="replace")[: m.start()].count("\n") + 1
            errors.append(f"{rel}:{line}: {src}/ may not include {m.group(1)} ({dst}/ is not "
                          f"below it; allowed: {', '.join(ALLOWED[src]) or 'nothing'})")
    print(f"check_layering: {checked} files checked")
    return errors


def self_test() -> int:
    """A kv/ header that includes runtime/ must be caught; a runtime/ file
    including kv/ must not."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "compute_worker/kv").mkdir(parents=True)
        (root / "compute_worker/runtime").mkdir(parents=True)
        (root / "compute_worker/kv/a.h").write_text('#include "compute_worker/runtime/b.h"\n')
        (root / "compute_worker/runtime/b.h").write_text('#include "compute_worker/kv/a.h"\n')
        errors = check(root)
    ok = len(errors) == 1 and errors[0].startswith("compute_worker/kv/a.h:1:")
    print("self-test:", "ok" if ok else f"FAILED, got {errors}")
    return 0 if ok else 1


def main() -> int:
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    errors = check(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
    for e in errors:
        print(e)
    print(f"check_layering: {len(errors)} include(s) pointing the wrong way")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
