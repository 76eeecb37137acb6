#!/usr/bin/env bash
# `make image`: the CPU image from the project's Dockerfile, on a machine without Docker or a
# registry: podman/buildah (chroot isolation, host network) and a Debian bookworm base made once
# with debootstrap (Python 3.11, as python:3.11-slim has), passed as the Dockerfile's PYTHON_IMAGE.
# With Docker and a registry, `docker build -t embedfleet:cpu .` does the same from python:3.11-slim.
#
#   IMAGE=localhost/embedfleet:cpu BASE=localhost/embedfleet-base:bookworm bash deploy/local/image.sh
set -euo pipefail

IMAGE=${IMAGE:-localhost/embedfleet:cpu}
BASE=${BASE:-localhost/embedfleet-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { echo "[image] $*"; }

for tool in podman buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "[image] $tool is missing: run deploy/local/system-deps.sh" >&2; exit 1; }
done

started=$(date +%s)
if podman image exists "$BASE"; then
  say "base $BASE already built"
else
  root=$(mktemp -d /var/tmp/embedfleet-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  say "making the base $BASE with debootstrap (Debian bookworm, Python 3.11; first time only) ..."
  # python-is-python3: `python` as in python:3.11-slim; passwd: useradd for the non-root user.
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    bookworm "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --quiet - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  say "base ready in $(( $(date +%s) - started )) s"
fi

build_args=(--format docker --isolation chroot --network host --layers --target cpu --build-arg "PYTHON_IMAGE=$BASE" -t "$IMAGE")
# A machine behind a TLS-inspecting proxy names its CA bundle in PIP_CERT: pip in the build
# needs it too. It is mounted read-only for the RUN steps, with a pip.conf naming it, so neither
# lands in a layer or in the image's environment.
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  pipconf=$(mktemp /var/tmp/embedfleet-pip.XXXXXX.conf)
  printf '[global]\ncert = /run/embedfleet-ca.pem\n' > "$pipconf"
  build_args+=(--volume "$PIP_CERT:/run/embedfleet-ca.pem:ro" --volume "$pipconf:/etc/pip.conf:ro")
fi
say "building $IMAGE from $repo/Dockerfile ..."
build_started=$(date +%s)
podman build "${build_args[@]}" "$repo"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in $(( $(date +%s) - build_started )) s ($(( $(date +%s) - started )) s in all); size $(( size / 1000000 )) MB"
