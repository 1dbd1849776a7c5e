#!/usr/bin/env bash
# Runs Ember's whole test suite on this machine: installs what the tests
# need (apt packages, the guest kernel and root filesystem, both cached under
# $EMBER_CACHE_DIR), checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
mkdir -p "$EMBER_CACHE_DIR"

# The tools the tests use, and protoc, which etcd-client's build needs.
bash tests/ensure-packages.sh curl:curl strace:strace mkfs.ext4:e2fsprogs debugfs:e2fsprogs \
    python3:python3 ip:iproute2 nft:nftables qemu-io:qemu-utils qemu-nbd:qemu-utils \
    qemu-storage-daemon:qemu-utils c++:g++ \
    nbdkit:nbdkit nbd-server:nbd-server nbdinfo:libnbd-bin etcd:etcd-server protoc:protobuf-compiler

# Unmodified AWS clients (botocore) for the tests that check against them.
EMBER_TEST_PYTHON="$(bash tests/python-env.sh)"
export EMBER_TEST_PYTHON

# 2 MiB huge pages for the tests that restore guests into them: raised to
# EMBER_TEST_HUGEPAGES (never lowered). Where the host does not allow it,
# those tests check the VMM's refusal instead.
want="${EMBER_TEST_HUGEPAGES:-160}"
have="$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)"
if [ "$have" -lt "$want" ] && ! echo "$want" 2>/dev/null >/proc/sys/vm/nr_hugepages; then
    echo "cannot raise vm.nr_hugepages to $want: the huge page tests check the refusal" >&2
fi

EMBER_KERNEL="$(bash kernels/build.sh)"
EMBER_ROOTFS="$(bash rootfs/build.sh)"
EMBER_ROOTFS_PROVIDED="$(bash rootfs/build.sh provided)"
EMBER_ROOTFS_PYTHON3="$(bash rootfs/build.sh python3)"
EMBER_ROOTFS_NODEJS="$(bash rootfs/build.sh nodejs)"
export EMBER_KERNEL EMBER_ROOTFS EMBER_ROOTFS_PROVIDED EMBER_ROOTFS_PYTHON3 EMBER_ROOTFS_NODEJS
echo "kernel: $EMBER_KERNEL" >&2
echo "rootfs: $EMBER_ROOTFS, $EMBER_ROOTFS_PROVIDED, $EMBER_ROOTFS_PYTHON3, $EMBER_ROOTFS_NODEJS" >&2

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace -- --nocapture
# Every fuzz target (fuzz/: its own workspace, built by cargo-fuzz on the
# stable toolchain) for 60 s on its committed corpus; fails on any crash.
bash fuzz/run.sh 60
