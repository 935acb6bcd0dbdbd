#!/usr/bin/env bash
# Refresh the locked installs after a change to pyproject.toml's dependencies (keeps every pin that still
# fits), or take the newest releases the ranges allow with --upgrade:
#   bash tools/lock.sh              # then commit requirements/*.txt
#   bash tools/lock.sh --upgrade
# requirements/lock.txt    every distribution of `pip install -e ".[test]"` (so also of ".[train]"): the README's
#                          commands and CI install with PIP_CONSTRAINT=requirements/lock.txt; torch is its CPU
#                          build (requirements/cpu.in)
# requirements/oldest.txt  every distribution of `pip install -e ".[smoke]"` with each direct dependency at the
#                          lower bound pyproject.toml declares (uv's --resolution lowest-direct): CI's
#                          compatibility job (.ci/run), torch and transformers at the lent GPU machine's versions
# Written by uv (a pinned release, installed into a scratch virtualenv when it is not on PATH) for CPython 3.11
# on x86-64 Linux, the machines CI runs on.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
uv=$(command -v uv || true)
if [[ -z $uv || $("$uv" --version | awk '{print $2}') != "$UV_VERSION" ]]; then
  scratch=${TMPDIR:-/tmp}/amllm-uv-$UV_VERSION
  [[ -x $scratch/bin/uv ]] || { python3 -m venv "$scratch" && "$scratch/bin/pip" install -q "uv==$UV_VERSION"; }
  uv=$scratch/bin/uv
fi
if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then  # this machine kind keeps torch's CPU wheel here
  cpu=(--find-links /opt/wheels)
else
  cpu=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "bash tools/lock.sh" -q "$@")
"$uv" pip compile pyproject.toml --extra test -c requirements/cpu.in "${cpu[@]}" "${common[@]}" -o requirements/lock.txt
"$uv" pip compile pyproject.toml --extra smoke --resolution lowest-direct "${common[@]}" -o requirements/oldest.txt
for f in requirements/lock.txt requirements/oldest.txt; do
  if grep -qE '^nvidia-' $f && [[ $f == requirements/lock.txt ]]; then
    echo "error: $f pulls CUDA wheels (nvidia-*): the CPU build of torch was not found" >&2; exit 1
  fi
  echo "$f: $(grep -cE '^[A-Za-z0-9].*==' $f) pinned distributions"
done
