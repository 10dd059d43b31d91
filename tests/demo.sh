#!/usr/bin/env bash
# The demo: a running VM moves with its disk between two namespaces over an emulated WAN link.
# Installs what it needs, builds, runs, cleans up (namespaces and processes are
# removed by the demo's guards, also when it fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo build --release --locked -p migrator -p tests
exec target/release/demo "$@"
