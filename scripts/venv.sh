#!/usr/bin/env bash
# Create or update a virtual environment with uv: scripts/venv.sh VENV [uv pip install arguments...]
#
# uv installs in seconds what pip took minutes over (no bytecode compiling; files linked from its
# cache, ~/.cache/uv). It is given pip's own sources (index-url, extra-index-url, find-links from
# `pip config list`, the PIP_* variables included), so it sees the same packages pip would, with
# pip's rule of taking the best version from any of them (--index-strategy unsafe-best-match).
#
# torch: where requirements pin torch==X, uv is constrained to X+cpu, the CPU build, which lies on
# this machine's disk (pip's find-links). Without it uv would resolve X to PyPI's CUDA build and
# download gigabytes; with the constraint it fails instead. Afterwards the venv is checked: a torch
# that is not +cpu, or any nvidia-* package, is an error.
#
# UV_VERSION pins uv, installed into the venv with pip (so pip's configuration applies to it too);
# or UV names a uv binary to use (the app venv's, for the infra venv, which then has no pip).
set -euo pipefail

venv=$1
shift
python=${PYTHON:-python3}
uv_version=${UV_VERSION:-0.13.8}
here=$(cd "$(dirname "$0")" && pwd)

if [ -n "${UV:-}" ]; then
  uv=$UV
  test -x "$venv/bin/python" || "$uv" venv --quiet --python "$python" "$venv"
else
  uv=$venv/bin/uv
  test -x "$venv/bin/python" || "$python" -m venv "$venv"
  if ! "$uv" --version 2>/dev/null | grep -qx "uv $uv_version"; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
  fi
fi

# pip's sources as uv arguments (uv reads no pip configuration of its own).
mapfile -t sources < <("$python" - <<'PY'
import re
import subprocess
import sys

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
seen = set()
for line in out.splitlines():
    m = re.match(r"^[^=]*\.(index-url|extra-index-url|find-links)='(.*)'$", line.strip())
    if not m:
        continue
    values = m.group(2).split()
    if m.group(1) == "index-url":
        values = values[:1]
    for value in values:
        if (m.group(1), value) not in seen:
            seen.add((m.group(1), value))
            print(flags[m.group(1)])
            print(value)
PY
)

# torch: the CPU build or nothing (see above).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
sed -n 's/^torch==\([0-9.]*\)[[:space:]]*\(#.*\)\{0,1\}$/torch==\1+cpu/p' "$here"/../requirements*.txt | sort -u >"$constraints"

"$uv" pip install --quiet --python "$venv/bin/python" --index-strategy unsafe-best-match \
  "${sources[@]}" --constraint "$constraints" "$@"

# Never a CUDA build: check what was installed, not what was asked for.
listing=$("$uv" pip list --python "$venv/bin/python" --format freeze 2>/dev/null)
if grep -qi '^nvidia-' <<<"$listing"; then
  echo "venv.sh: a CUDA package was installed into $venv:" >&2
  grep -i '^nvidia-' <<<"$listing" >&2
  exit 1
fi
if grep -q '^torch==' <<<"$listing" && ! grep -q '^torch==.*+cpu$' <<<"$listing"; then
  echo "venv.sh: $(grep '^torch==' <<<"$listing") in $venv is not the CPU build" >&2
  exit 1
fi
