#!/usr/bin/env bash
# The demo: `migrator migrate` moves a running VM with its disk, its open
# connections and its DNS name from site A to site B across an emulated WAN.
# Installs what it needs, builds, runs, cleans up (namespaces and processes
# are removed by the demo's guards, also when it fails or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo build --release --locked -p migrator -p gateway -p tests
exec target/release/demo "$@"
