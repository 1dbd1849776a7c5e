#!/usr/bin/env bash
# Runs every Ember benchmark with fresh release binaries, printing numbers:
# VMM start-up, boot to agent, VMM memory overhead, snapshot create,
# restore latency and the memory of clones; emberd's invoke latency (warm,
# restored, fresh boot), throughput and memory per warm instance.
# Arguments go to `cargo bench`: `bash benches/run.sh --bench hostd` runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
EMBER_KERNEL="$(bash kernels/build.sh)"
EMBER_ROOTFS="$(bash rootfs/build.sh)"
EMBER_ROOTFS_PYTHON3="$(bash rootfs/build.sh python3)"
EMBER_ROOTFS_PROVIDED="$(bash rootfs/build.sh provided)"
export EMBER_KERNEL EMBER_ROOTFS EMBER_ROOTFS_PYTHON3 EMBER_ROOTFS_PROVIDED
cargo build --release --workspace --bins
cargo bench -p ember-benches "$@"
