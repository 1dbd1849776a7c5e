#!/usr/bin/env bash
# Runs every Ember benchmark with fresh release binaries, printing numbers:
# VMM start-up, boot to agent, VMM memory overhead, snapshot create,
# restore latency and the memory of clones; restore to the first answer
# with a connect-once client; emberd's invoke latency (warm,
# restored, fresh boot), throughput and memory per warm instance;
# virtio-net throughput and TCP latency with and without connection
# tracking (Debian's iperf3 in the guest and on the host); block I/O with
# the in-VMM file backend against vhost-user to qemu-storage-daemon and to
# ember-volumed; invoke latency and throughput through ember-cluster against
# straight to emberd; live migration downtime and bytes sent; live volume
# copies (move, split) between two ember-volumeds; a fill_from drive
# filling from ember-export (background copy, on-demand reads).
# Arguments go to `cargo bench`: `bash benches/run.sh --bench hostd` runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
EMBER_KERNEL="$(bash kernels/build.sh)"
EMBER_ROOTFS="$(bash rootfs/build.sh)"
EMBER_ROOTFS_PYTHON3="$(bash rootfs/build.sh python3)"
EMBER_ROOTFS_NODEJS="$(bash rootfs/build.sh nodejs)"
EMBER_ROOTFS_PROVIDED="$(bash rootfs/build.sh provided)"
EMBER_ROOTFS_BENCH="$(bash rootfs/build.sh bench)"
export EMBER_KERNEL EMBER_ROOTFS EMBER_ROOTFS_PYTHON3 EMBER_ROOTFS_NODEJS EMBER_ROOTFS_PROVIDED EMBER_ROOTFS_BENCH
# The host's end of the network benchmark, protoc for etcd-client, and
# etcd for the cluster benchmark.
bash tests/ensure-packages.sh iperf3:iperf3 protoc:protobuf-compiler etcd:etcd-server
cargo build --release --workspace --bins
cargo bench -p ember-benches "$@"
