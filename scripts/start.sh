#!/usr/bin/env bash
# Starts a single oxcd member with etcd's defaults: client API on http://localhost:2379,
# data in ./default.etcd. Installs missing build packages first and builds the release binary.
# Extra arguments are passed to oxcd (etcd's flags, e.g. --data-dir /tmp/x).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
oxcd_check_cargo
oxcd_install_packages clang libclang-dev g++ make
echo ">> building oxcd (release; the first build compiles RocksDB and takes several minutes)"
cargo build --release -p oxcd
echo ">> starting oxcd (Ctrl-C to stop); try: ETCDCTL_API=3 etcdctl put foo bar"
exec "$CARGO_TARGET_DIR/release/oxcd" "$@"
