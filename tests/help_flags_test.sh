#!/usr/bin/env bash
# Every binary's --help lists its own flags and exits 0; --helpfull adds
# Abseil's flags; an unknown flag still fails. Arguments: BINARY FLAG pairs,
# FLAG being one of that binary's own flags (registered in tests/CMakeLists.txt).
set -uo pipefail
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

while [ $# -ge 2 ]; do
  bin="$1" flag="$2"
  shift 2
  name="$(basename "$bin")"

  out="$("$bin" --help 2>&1)"; rc=$?
  [ "$rc" -eq 0 ] || fail "$name --help exited $rc"
  grep -q -- "--$flag " <<<"$out" || fail "$name --help does not list --$flag"
  grep -q "No flags matched" <<<"$out" && fail "$name --help says \"No flags matched\""
  grep -q -- "--flagfile " <<<"$out" && fail "$name --help lists Abseil's own flags"

  out="$("$bin" --helpfull 2>&1)"; rc=$?
  [ "$rc" -eq 0 ] || fail "$name --helpfull exited $rc"
  grep -q -- "--$flag " <<<"$out" || fail "$name --helpfull does not list --$flag"
  grep -q -- "--flagfile " <<<"$out" || fail "$name --helpfull does not list --flagfile"

  "$bin" --no_such_flag_for_help_test >/dev/null 2>&1
  rc=$?
  [ "$rc" -ne 0 ] || fail "$name accepted an unknown flag"
  echo "ok: $name (--$flag)"
done
[ $# -eq 0 ] || fail "odd argument count: $* left over"
exit $((failures > 0))
