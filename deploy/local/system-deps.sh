#!/usr/bin/env bash
# Installs the system tools the local stack and the tests need, when they are missing:
# Java 17+ (the Kafka broker), Maven (fetches the broker jars), kcat (an independent Kafka client
# the tests use to prove the wire contract is language-neutral), Go (the Go client's tests, and
# `go install` of Toxiproxy, the tests' fault proxy, which stack.py builds on first `up`),
# promtool (tests/deploy checks the Prometheus rules; Debian ships it in `prometheus`), podman,
# buildah and debootstrap (`make image`: the container image, built and run in the tests).
set -euo pipefail

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v kcat >/dev/null || missing+=(kcat)
command -v go >/dev/null || missing+=(golang-go)
command -v promtool >/dev/null || missing+=(prometheus)
# `make image` (and so `make test`): the CPU image built and run without Docker or a registry.
command -v podman >/dev/null || missing+=(podman)
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "[system-deps] installing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  sudo=sudo
  command -v sudo >/dev/null || { echo "[system-deps] not root and no sudo: install ${missing[*]} yourself" >&2; exit 1; }
else
  sudo=
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
