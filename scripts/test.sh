#!/usr/bin/env bash
# Runs every check: formatting, clippy (warnings are errors), all unit and end-to-end tests
# (real oxcd processes driven by etcdctl and the etcd-client crate, differential runs against
# etcd 3.4), and a short benchmark smoke run. Installs missing Debian and Python packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
oxcd_check_cargo
oxcd_install_packages clang libclang-dev g++ make protobuf-compiler libprotobuf-dev etcd-server etcd-client prometheus
oxcd_install_pip_packages kubernetes-validate==1.37.0

echo ">> cargo fmt --check"
cargo fmt --all -- --check
# Every cargo call selects the same packages and targets, so dependencies (RocksDB above all,
# minutes to compile) are built once with one feature set and shared by all steps.
echo ">> building everything (the end-to-end tests start the oxcd binary built here)"
cargo build --workspace --all-targets
echo ">> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings
echo ">> cargo test"
cargo test --workspace --all-targets
echo ">> benchmark smoke run (checks that no request fails; does not judge speed)"
cargo xtask bench --quick --oxcd-bin "$CARGO_TARGET_DIR/debug/oxcd"
echo ">> all checks passed"
