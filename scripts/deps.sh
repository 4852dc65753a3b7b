#!/usr/bin/env bash
# Installs the Debian packages oxcd needs and that are missing. Sourced by start.sh and test.sh.
#   build: clang + libclang-dev (RocksDB's bindings), g++ and make (RocksDB itself)
#   tests: protobuf-compiler + libprotobuf-dev (the etcd-client crate), etcd-server + etcd-client (etcd 3.4, the
#          reference server and etcdctl for differential and client tests), prometheus (promtool and a
#          real Prometheus for the deploy/ tests); Python: kubernetes-validate (the manifests' schema check)
set -euo pipefail

oxcd_install_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo ">> installing Debian packages: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      echo "!! need root (or sudo) to install: ${missing[*]}" >&2; return 1
    fi
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Installs Python packages, given as name==version, for the first python3 on PATH (the one the
# tests run), unless that exact version is there already.
oxcd_install_pip_packages() {
  local missing=()
  for spec in "$@"; do
    local have
    have="$(python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "${spec%%==*}" 2>/dev/null || true)"
    [ "$have" = "${spec#*==}" ] || missing+=("$spec")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo ">> installing Python packages: ${missing[*]}"
  python3 -m pip --version >/dev/null 2>&1 || oxcd_install_packages python3-pip
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
}

oxcd_check_cargo() {
  if ! command -v cargo >/dev/null; then
    echo "!! cargo (Rust toolchain) is required: install it with rustup, then re-run." >&2
    return 1
  fi
}

# A target dir outside the clone keeps rebuilds fast across clones (RocksDB takes minutes).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/oxcd-target}"
