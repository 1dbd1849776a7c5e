#!/usr/bin/env bash
# Runs every Ember benchmark with fresh release binaries, printing numbers:
# VMM start-up, boot to agent, VMM memory overhead, snapshot create,
# restore latency and the memory of clones.
set -euo pipefail
cd "$(dirname "$0")/.."
export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
EMBER_KERNEL="$(bash kernels/build.sh)"
EMBER_ROOTFS="$(bash rootfs/build.sh)"
export EMBER_KERNEL EMBER_ROOTFS
cargo build --release --workspace --bins
cargo bench -p ember-benches
