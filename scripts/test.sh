#!/usr/bin/env bash
# Runs every check: formatting, clippy (warnings are errors), all unit and end-to-end tests
# (real oxcd processes driven by etcdctl and the etcd-client crate, differential runs against
# etcd 3.4), and a short benchmark smoke run. Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
oxcd_check_cargo
oxcd_install_packages clang libclang-dev g++ make protobuf-compiler etcd-server etcd-client

echo ">> cargo fmt --check"
cargo fmt --all -- --check
echo ">> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings
echo ">> building the oxcd binary the end-to-end tests start"
cargo build -p oxcd
echo ">> cargo test"
cargo test --workspace -- --test-threads=2
echo ">> benchmark smoke run (checks that no request fails; does not judge speed)"
cargo xtask bench --quick
echo ">> all checks passed"
