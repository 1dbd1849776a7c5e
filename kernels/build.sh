#!/usr/bin/env bash
# Build Ember's guest kernel: an uncompressed x86_64 vmlinux (ELF) from
# Debian's linux-source-6.1 package, patched (patches/*.patch) and configured
# from microvm-x86_64.config, cached by the hash of its inputs.
#
# Usage:  kernels/build.sh            (as root; Debian 12)
#   stdout: only the path of the vmlinux (last and only line)
#   stderr: progress; the full make output goes to a log in the cache dir
#
# Environment:
#   EMBER_CACHE_DIR      cache root (default /var/cache/ember); outputs land
#                        in $EMBER_CACHE_DIR/kernel/<key>/{vmlinux,System.map,
#                        config,inputs.txt,build.log}
#   EMBER_KERNEL_JOBS    make -j value (default: nproc)
#
# Cache key: sha256 (first 16 hex chars) over this script, the config
# fragment, every patch (name and content, in order) and the installed
# linux-source-6.1 package version (dpkg-query). A cached run only reads
# dpkg's database: it never calls apt and returns at once. Any changed input
# gives a new key and a new build.
#
# Build tree: one per source package version,
# $EMBER_CACHE_DIR/kernel/tree-<version>/linux-source-6.1, kept between runs
# and shared by all keys, so changing a patch or a config line recompiles only
# what changed (seconds to a minute) instead of the whole kernel (~5 min on
# 2 cores). The previously applied patches are reverse-applied first; if that
# fails the tree is re-extracted. Builds are serialized with flock.
#
# Boot arguments: this script does not bake a command line into the kernel.
# See cmdline.md next to it; in short, on the nested development/CI machines
# (kvm_pvm, see /work/shared/NESTED-KVM.md) the guest needs
#   noxsave nokaslr tsc=reliable no_timer_check clearcpuid=cx16,popcnt,avx,
#   avx2,bmi1,bmi2,erms,fsrm,movbe,rdrand,rdseed,clwb,clflushopt,sha_ni,aes,
#   pclmulqdq,fsgsbase,smap,smep,xsaveopt,avx512f,rdpid,umip,pku,ospke,pcid,
#   invpcid
# which the VMM appends itself when /sys/module/kvm_pvm exists
# (vmm/src/arch/x86_64/nested.rs).

set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# Everything but the final path goes to stderr.
exec 3>&1 1>&2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$HERE/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$HERE/microvm-x86_64.config"
PATCH_DIR="$HERE/patches"
CACHE_ROOT="${EMBER_CACHE_DIR:-/var/cache/ember}/kernel"
JOBS="${EMBER_KERNEL_JOBS:-$(nproc)}"

SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC_DIRNAME=linux-source-6.1
# Build tools. gcc is installed without recommends, hence libc6-dev.
BUILD_PKGS=(make gcc libc6-dev bc bison flex libelf-dev libssl-dev xz-utils patch)

log() { printf '[kernels/build.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

src_version() {
    if pkg_installed "$SRC_PKG"; then
        dpkg-query -W -f='${Version}' "$SRC_PKG"
    fi
}

sha() { sha256sum | cut -c1-64; }

# Lines that name every input of the build; the key is their hash.
key_inputs() {
    local ver=$1 p
    echo "arch x86_64"
    echo "source $SRC_PKG $ver"
    echo "script $(sha < "$SCRIPT")"
    echo "fragment $(sha < "$FRAGMENT")"
    for p in "${PATCHES[@]}"; do
        echo "patch $(basename "$p") $(sha < "$p")"
    done
}

[[ -f "$FRAGMENT" ]] || die "missing config fragment $FRAGMENT"
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)   # glob order is sorted: 0001-, 0002-, ...
shopt -u nullglob

# --- 1. Fast path: cached output for the installed source package ----------
SRC_VER=$(src_version)
if [[ -n "$SRC_VER" ]]; then
    KEY=$(key_inputs "$SRC_VER" | sha | cut -c1-16)
    if [[ -f "$CACHE_ROOT/$KEY/vmlinux" ]]; then
        log "cached: $CACHE_ROOT/$KEY/vmlinux"
        echo "$CACHE_ROOT/$KEY/vmlinux" >&3
        exit 0
    fi
fi

# --- 2. Tools and kernel source (apt only when something is missing) -------
missing=()
for p in "$SRC_PKG" "${BUILD_PKGS[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "need root to install: ${missing[*]}"
    log "installing: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
[[ -f "$SRC_TARBALL" ]] || die "$SRC_TARBALL not found after installing $SRC_PKG"

SRC_VER=$(src_version)
[[ -n "$SRC_VER" ]] || die "$SRC_PKG is not installed"
KEY=$(key_inputs "$SRC_VER" | sha | cut -c1-16)
OUT="$CACHE_ROOT/$KEY"
TREE_PARENT="$CACHE_ROOT/tree-${SRC_VER//[^A-Za-z0-9.+-]/_}"
TREE="$TREE_PARENT/$SRC_DIRNAME"
STATE="$TREE/.ember-applied-patches"
LOGFILE="$CACHE_ROOT/build-$KEY.log"

mkdir -p "$CACHE_ROOT"

# One build at a time per source tree (concurrent test runs, CI jobs).
exec 9>"$TREE_PARENT.lock"
if ! flock -n 9; then
    log "another build holds $TREE_PARENT.lock; waiting"
    flock 9
fi
if [[ -f "$OUT/vmlinux" ]]; then      # built by whoever held the lock
    log "cached: $OUT/vmlinux"
    echo "$OUT/vmlinux" >&3
    exit 0
fi

START=$(date +%s)
log "building kernel $KEY ($SRC_PKG $SRC_VER, ${#PATCHES[@]} patches, -j$JOBS)"
log "log: $LOGFILE"
: > "$LOGFILE"

fail_with_log() {
    log "ERROR: $1; last lines of $LOGFILE:"
    tail -n 60 "$LOGFILE" >&2 || true
    exit 1
}

extract_tree() {
    log "extracting $SRC_TARBALL"
    rm -rf "$TREE_PARENT"
    local tmp
    tmp=$(mktemp -d "$CACHE_ROOT/.extract.XXXXXX")
    tar -C "$tmp" -xf "$SRC_TARBALL"
    [[ -d "$tmp/$SRC_DIRNAME" ]] || die "tarball has no $SRC_DIRNAME/"
    mv -T "$tmp" "$TREE_PARENT"
}

# --- 3. Source tree with exactly the current patches applied ---------------
patch_list_id() {   # identity of a list of patch files (names + contents)
    local p
    for p in "$@"; do echo "$(basename "$p") $(sha < "$p")"; done | sha
}

[[ -d "$TREE" ]] || extract_tree

if [[ -f "$TREE/.ember-patching" ]]; then
    # A run was interrupted while it patched the tree.
    log "tree was left half-patched; re-extracting"
    extract_tree
fi
shopt -s nullglob
OLD_PATCHES=("$STATE"/*.patch)
shopt -u nullglob
if [[ "$(patch_list_id "${OLD_PATCHES[@]}")" != "$(patch_list_id "${PATCHES[@]}")" ]]; then
    touch "$TREE/.ember-patching"
    if ((${#OLD_PATCHES[@]})); then
        log "patch set changed: reverting ${#OLD_PATCHES[@]} old patch(es)"
        reverted=1
        for ((i = ${#OLD_PATCHES[@]} - 1; i >= 0; i--)); do
            if ! patch -d "$TREE" -p1 -R --batch -s < "${OLD_PATCHES[$i]}" >>"$LOGFILE" 2>&1; then
                reverted=0
                break
            fi
        done
        if ((!reverted)); then
            log "reverting failed; re-extracting the source"
            extract_tree
            touch "$TREE/.ember-patching"
        fi
        rm -rf "$STATE"
    fi
    for p in "${PATCHES[@]}"; do
        log "applying $(basename "$p")"
        if ! patch -d "$TREE" -p1 --forward --batch < "$p" >>"$LOGFILE" 2>&1; then
            rm -rf "$TREE_PARENT"   # never leave a half-patched tree behind
            fail_with_log "patch $(basename "$p") does not apply to $SRC_PKG $SRC_VER"
        fi
    done
    mkdir -p "$STATE"
    for p in "${PATCHES[@]}"; do cp "$p" "$STATE/"; done
    rm -f "$TREE/.ember-patching"
else
    log "source tree already has the current patches"
fi

# --- 4. Configure -----------------------------------------------------------
# allnoconfig with the fragment as KCONFIG_ALLCONFIG: the fragment's values
# are set and every other symbol is off wherever Kconfig allows it (this is
# what scripts/kconfig/merge_config.sh -n does). Merging the fragment into an
# allnoconfig .config and running olddefconfig instead would give every
# symbol that becomes visible through the fragment its *default* (often y):
# CONFIG_NET=y alone would bring in IPv6, wireless, netfilter, ...
MAKE=(make -C "$TREE" ARCH=x86_64 KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember)
[[ -f "$TREE/.config" ]] && cp -p "$TREE/.config" "$TREE/.config.ember-prev"
log "configuring (allnoconfig + $(basename "$FRAGMENT"))"
"${MAKE[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >>"$LOGFILE" 2>&1 \
    || fail_with_log "make allnoconfig failed"
"${MAKE[@]}" olddefconfig >>"$LOGFILE" 2>&1 || fail_with_log "make olddefconfig failed"
if [[ -f "$TREE/.config.ember-prev" ]]; then
    # Unchanged configuration: keep the old timestamp so make has nothing to
    # redo for it.
    if cmp -s "$TREE/.config" "$TREE/.config.ember-prev"; then
        mv -f "$TREE/.config.ember-prev" "$TREE/.config"
    else
        rm -f "$TREE/.config.ember-prev"
    fi
fi

# Every line of the fragment must hold in the final .config. A missing
# dependency or a select from elsewhere silently changes a value; catch it.
log "verifying the configuration against the fragment"
known_syms=$(find "$TREE" -name 'Kconfig*' -type f -print0 \
    | xargs -0 sed -nE 's/^[[:space:]]*(menu)?config[[:space:]]+([A-Za-z0-9_]+).*/\2/p' \
    | sort -u)
bad=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        got=$(grep -E "^$sym=" "$TREE/.config" | head -n1 | cut -d= -f2- || true)
        [[ "$got" == "$want" ]] || bad+=("$line   (final .config: ${got:-not set})")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        got=$(grep -E "^$sym=" "$TREE/.config" | head -n1 | cut -d= -f2- || true)
        [[ -z "$got" ]] || bad+=("$line   (final .config: $got)")
    else
        continue
    fi
    grep -qx "${sym#CONFIG_}" <<<"$known_syms" || bad+=("$line   (no such Kconfig symbol)")
done < "$FRAGMENT"
if ((${#bad[@]})); then
    log "ERROR: these lines of $(basename "$FRAGMENT") did not stick:"
    printf '    %s\n' "${bad[@]}" >&2
    log "(fix the fragment: add the missing dependencies or drop the line)"
    exit 1
fi

# --- 5. Build ---------------------------------------------------------------
log "make -j$JOBS vmlinux (this takes a few minutes on a fresh tree)"
"${MAKE[@]}" -j"$JOBS" vmlinux >>"$LOGFILE" 2>&1 || fail_with_log "kernel build failed"

file_type=$(head -c 5 "$TREE/vmlinux" | od -An -tx1 | tr -d ' \n')
[[ "$file_type" == 7f454c4602 ]] || die "$TREE/vmlinux is not a 64-bit ELF"

# --- 6. Publish atomically --------------------------------------------------
tmp=$(mktemp -d "$CACHE_ROOT/.out-$KEY.XXXXXX")
cp "$TREE/vmlinux" "$tmp/vmlinux"
cp "$TREE/System.map" "$tmp/System.map"
cp "$TREE/.config" "$tmp/config"
key_inputs "$SRC_VER" > "$tmp/inputs.txt"
cp "$LOGFILE" "$tmp/build.log"
chmod 0755 "$tmp"
rm -rf "$OUT"                        # only a leftover without vmlinux
mv -T "$tmp" "$OUT"
rm -f "$LOGFILE"
rm -rf "$CACHE_ROOT/.out-$KEY".* 2>/dev/null || true  # stale, from killed runs (we hold the lock)

log "done in $(($(date +%s) - START)) s: $OUT/vmlinux"
echo "$OUT/vmlinux" >&3
