#!/usr/bin/env bash
# Runs Ember's whole test suite on this machine: installs what the tests
# need (apt packages, the guest kernel and root filesystem, both cached under
# $EMBER_CACHE_DIR), checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
mkdir -p "$EMBER_CACHE_DIR"

need_apt=()
for tool in curl:curl strace:strace mkfs.ext4:e2fsprogs debugfs:e2fsprogs python3:python3 ip:iproute2 nft:nftables qemu-storage-daemon:qemu-utils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "installing ${need_apt[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${need_apt[@]}" | sort -u) >&2
fi

EMBER_KERNEL="$(bash kernels/build.sh)"
EMBER_ROOTFS="$(bash rootfs/build.sh)"
EMBER_ROOTFS_PROVIDED="$(bash rootfs/build.sh provided)"
EMBER_ROOTFS_PYTHON3="$(bash rootfs/build.sh python3)"
export EMBER_KERNEL EMBER_ROOTFS EMBER_ROOTFS_PROVIDED EMBER_ROOTFS_PYTHON3
echo "kernel: $EMBER_KERNEL" >&2
echo "rootfs: $EMBER_ROOTFS, $EMBER_ROOTFS_PROVIDED, $EMBER_ROOTFS_PYTHON3" >&2

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace -- --nocapture
