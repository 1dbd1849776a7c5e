#!/usr/bin/env bash
# Builds the Ember guest root filesystem: an ext4 image whose /sbin/init is
# the statically linked `ember-agent`, plus Debian's busybox-static (/bin/sh,
# cat, dd, ...) so tests can run commands in the guest through Exec.
#
# Usage: rootfs/build.sh [--print-key] [--force]
#   stdout: the image path (only line), progress and errors on stderr.
#   --print-key  print the cache key and exit
#   --force      rebuild even if the cached image exists
#
# Output: ${EMBER_CACHE_DIR:-/var/cache/ember}/rootfs/<key>/rootfs.ext4,
# where <key> hashes everything that goes into the image (agent sources,
# Cargo.lock, this directory, busybox/e2fsprogs/rustc versions, size), so a
# repeated run with nothing changed returns at once.
#
# Environment: EMBER_CACHE_DIR, EMBER_ROOTFS_SIZE_MB (default 64).
# Needs: cargo/rustc (host toolchain, target x86_64-unknown-linux-gnu);
# installs busybox-static, e2fsprogs and file with apt-get if missing (root).
set -euo pipefail

FORMAT=1 # bump to invalidate every cached image
TARGET=x86_64-unknown-linux-gnu
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
CACHE_DIR=${EMBER_CACHE_DIR:-/var/cache/ember}
SIZE_MB=${EMBER_ROOTFS_SIZE_MB:-64}
START=$(date +%s.%N)

log() { printf 'rootfs: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

PRINT_KEY=0
FORCE=0
for arg in "$@"; do
    case $arg in
    --print-key) PRINT_KEY=1 ;;
    --force) FORCE=1 ;;
    -h | --help)
        sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        exit 0
        ;;
    *) die "unknown argument: $arg" ;;
    esac
done
[[ $SIZE_MB =~ ^[0-9]+$ ]] && ((SIZE_MB >= 16)) || die "EMBER_ROOTFS_SIZE_MB must be an integer >= 16"

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }

ensure_packages() {
    local missing=() p
    for p in busybox-static e2fsprogs file; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root or install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists if installing from the current ones fails.
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
}

compute_key() {
    command -v rustc >/dev/null || die "rustc not found in PATH"
    (
        cd "$REPO"
        echo "format $FORMAT target $TARGET size ${SIZE_MB}M"
        find guest-agent rootfs -type f ! -path '*/target/*' ! -name '*.swp' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum Cargo.lock Cargo.toml
        if [[ -f .cargo/config.toml ]]; then sha256sum .cargo/config.toml; fi
        echo "busybox-static $(pkg_version busybox-static)"
        echo "e2fsprogs $(pkg_version e2fsprogs)"
        rustc -vV
    ) | sha256sum | cut -c1-16
}

ensure_packages
KEY=$(compute_key)
if ((PRINT_KEY)); then
    echo "$KEY"
    exit 0
fi
OUT_DIR=$CACHE_DIR/rootfs/$KEY
OUT=$OUT_DIR/rootfs.ext4
if [[ -f $OUT ]] && ((!FORCE)); then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE_DIR/rootfs"
# One builder at a time; a concurrent run waits, then finds the image.
exec 9>"$CACHE_DIR/rootfs/.lock"
flock 9
if [[ -f $OUT ]] && ((!FORCE)); then
    log "built by a concurrent run: $OUT"
    echo "$OUT"
    exit 0
fi

# 1. The agent, statically linked (glibc static; no musl here). The explicit
#    --target keeps RUSTFLAGS away from build scripts and proc macros, and
#    the separate target dir keeps host builds untouched.
command -v cargo >/dev/null || die "cargo not found in PATH"
log "building ember-agent (static, $TARGET)"
(
    cd "$REPO"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_TARGET_DIR="$CACHE_DIR/cargo-target-static" \
        CARGO_PROFILE_RELEASE_DEBUG=0 \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_PROFILE_RELEASE_LTO=true \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release --locked -p ember-agent --bin ember-agent --target "$TARGET" >&2
)
AGENT_BIN=$CACHE_DIR/cargo-target-static/$TARGET/release/ember-agent
[[ -x $AGENT_BIN ]] || die "agent binary missing: $AGENT_BIN"
FILE_OUT=$(file -b "$AGENT_BIN")
LDD_OUT=$(ldd "$AGENT_BIN" 2>&1 || true)
if [[ $FILE_OUT != *"statically linked"* && $FILE_OUT != *"static-pie linked"* ]] ||
    [[ $LDD_OUT != *"not a dynamic executable"* && $LDD_OUT != *"statically linked"* ]]; then
    die "ember-agent is not static: file: $FILE_OUT; ldd: $LDD_OUT"
fi
log "agent: $(stat -c %s "$AGENT_BIN") bytes, $FILE_OUT"

BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX missing (busybox-static)"
BB_FILE=$(file -b -L "$BUSYBOX")
[[ $BB_FILE == *"statically linked"* || $BB_FILE == *"static-pie linked"* ]] ||
    die "$BUSYBOX is not static: $BB_FILE"

# 2. Staging tree.
STAGING=$(mktemp -d "$CACHE_DIR/rootfs/.staging.XXXXXX")
TMP_IMG=""
cleanup() {
    rm -rf "$STAGING"
    if [[ -n $TMP_IMG ]]; then rm -f "$TMP_IMG"; fi
}
trap cleanup EXIT
chmod 0755 "$STAGING"
(
    cd "$STAGING"
    mkdir -p bin sbin usr/bin usr/sbin etc root mnt proc sys dev tmp run var/tmp
    chmod 0755 bin sbin usr usr/bin usr/sbin etc mnt proc sys dev run var
    chmod 0700 root
    chmod 1777 tmp var/tmp
    install -m 0755 "$AGENT_BIN" sbin/init
    install -m 0755 "$BUSYBOX" bin/busybox
    # Applet links (absolute, resolved inside the guest). Never busybox's
    # init: /sbin/init is the agent.
    while read -r applet; do
        case $applet in
        sbin/init | linuxrc | bin/busybox | "") continue ;;
        esac
        [[ -e $applet || -L $applet ]] && continue
        mkdir -p "$(dirname "$applet")"
        ln -s /bin/busybox "$applet"
    done < <("$BUSYBOX" --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\n' >etc/passwd
    printf 'root:x:0:\n' >etc/group
    printf 'ember\n' >etc/hostname
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >etc/hosts
    printf 'NAME="Ember"\nID=ember\n' >etc/os-release
    ln -s /proc/self/mounts etc/mtab
    chmod 0644 etc/passwd etc/group etc/hostname etc/hosts etc/os-release
    # Fallback nodes for a kernel without devtmpfs (devtmpfs hides them).
    if [[ $(id -u) == 0 ]]; then
        mknod -m 0600 dev/console c 5 1
        mknod -m 0666 dev/null c 1 3
    fi
)
for f in sh cat dd echo ls mount sync sleep head od md5sum sha256sum; do
    [[ -L $STAGING/bin/$f || -L $STAGING/usr/bin/$f ]] || die "busybox lacks applet $f"
done

# 3. The image. No journal (the rootfs is per-VM and disposable, and every
#    guest kernel cycle is expensive here); inode tables initialised now,
#    not lazily by a guest kernel thread; everything owned by root.
mkdir -p "$OUT_DIR"
TMP_IMG=$(mktemp "$OUT_DIR/.rootfs.ext4.XXXXXX")
log "creating ${SIZE_MB} MiB ext4 image"
mkfs.ext4 -q -F -t ext4 -b 4096 -m 0 -L ember-root \
    -O ^has_journal \
    -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 \
    -d "$STAGING" "$TMP_IMG" "${SIZE_MB}M" >&2
chmod 0644 "$TMP_IMG"
INIT_STAT=$(debugfs -R 'stat /sbin/init' "$TMP_IMG" 2>/dev/null || true)
[[ $INIT_STAT == *"Type: regular"* ]] || die "/sbin/init missing from the image"
mv -f "$TMP_IMG" "$OUT"
TMP_IMG=""

END=$(date +%s.%N)
log "built $OUT in $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }') s"
echo "$OUT"
