#!/usr/bin/env bash
# Builds an Ember guest root filesystem: an ext4 image whose /sbin/init is
# the statically linked `ember-agent`, plus Debian's busybox-static (/bin/sh,
# cat, dd, ...) so tests can run commands in the guest through Exec.
#
# Usage: rootfs/build.sh [base|provided|python3|nodejs|bench] [--print-key] [--force]
#   base      (default) the agent and busybox only
#   provided  + Debian's bash, curl and ca-certificates: Lambda's custom
#             runtime (`bootstrap` in bash + curl against the Runtime API)
#   python3   + Debian's python3 (3.11), precompiled, and awslambdaric from
#             PyPI (rootfs/python3-requirements.txt): python3 -m awslambdaric
#   nodejs    + Debian's nodejs (18), and Ember's own runtime interface
#             client (rootfs/nodejs/ric.js, /usr/lib/ember/ric.js)
#   bench     + Debian's iperf3 (and its libraries), for benches/benches/net.rs
#   stdout: the image path (only line), progress and errors on stderr.
#   --print-key  print the cache key and exit
#   --force      rebuild even if the cached image exists
#
# Output: ${EMBER_CACHE_DIR:-/var/cache/ember}/rootfs/<key>/rootfs.ext4,
# where <key> hashes everything that goes into the image (agent sources,
# Cargo.lock, this directory, busybox/e2fsprogs/rustc versions, size; for
# provided/python3 also the variant and every Debian package and version),
# so a repeated run with nothing changed returns at once. Downloaded .debs
# and wheels are kept in rootfs/debs/ and rootfs/wheels/ under the cache.
#
# Environment: EMBER_CACHE_DIR, EMBER_ROOTFS_SIZE_MB (default 64 for base;
# provided/python3/bench are sized to their content unless it is set).
# Needs: cargo/rustc (host toolchain, target x86_64-unknown-linux-gnu);
# installs busybox-static, e2fsprogs and file (python3: also python3-pip)
# with apt-get if missing (root). provided/python3/bench must run as root (dpkg -x
# ownership, chroot for compileall/ldconfig) and need the apt sources.
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
VARIANT=""
for arg in "$@"; do
    case $arg in
    base | provided | python3 | nodejs | bench)
        [[ -z $VARIANT ]] || die "more than one variant: $VARIANT, $arg"
        VARIANT=$arg
        ;;
    --print-key) PRINT_KEY=1 ;;
    --force) FORCE=1 ;;
    -h | --help)
        sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        exit 0
        ;;
    *) die "unknown argument: $arg (variants: base, provided, python3, nodejs, bench)" ;;
    esac
done
VARIANT=${VARIANT:-base}
[[ $SIZE_MB =~ ^[0-9]+$ ]] && ((SIZE_MB >= 16)) || die "EMBER_ROOTFS_SIZE_MB must be an integer >= 16"
# provided/python3 are sized to fit their content unless the size is set.
AUTO_SIZE=0
if [[ $VARIANT != base && -z ${EMBER_ROOTFS_SIZE_MB:-} ]]; then AUTO_SIZE=1; fi

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }

ensure_packages() {
    local missing=() p
    local want=(busybox-static e2fsprogs file)
    # The host's own pip (Debian's), only to fetch and unpack wheels for
    # the guest's interpreter; whatever python3 the host runs does not matter.
    if [[ $VARIANT == python3 ]]; then want+=(python3-pip); fi
    for p in "${want[@]}"; do
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

# --- Debian packages and wheels (provided, python3) ---------------------
# The packages are unpacked with `dpkg -x` into the staging tree instead of
# installed by `debootstrap --variant=minbase`: minbase brings apt, dpkg,
# perl-base, coreutils and the rest of the Essential set (well over 100 MB
# unpacked) that a read-only, single-purpose guest never runs and that would
# have to be deleted again; it runs every maintainer script in a chroot
# (slow, and what they set up is mostly package-manager state); and it
# cannot leave packages out. With dpkg -x the image holds exactly the
# dependency closure of a few root packages, and the few maintainer-script
# effects that matter (CA bundle, ld.so.cache, .pyc files) are done below.
#
# The closure is apt's own resolution, `apt-get -s install
# --no-install-recommends ROOTS` against a fake, nearly empty dpkg status:
# unlike `apt-cache depends --recurse` it takes one branch of "a | b" (not
# all of them) and the candidate version of each package. DEB_ASSUMED are
# needed only by maintainer scripts or the package manager; the fake status
# marks them installed so that they and their own dependencies stay out.
DEB_ROOTS_provided=(bash curl ca-certificates netbase)
DEB_ROOTS_python3=(python3 libstdc++6 ca-certificates netbase)
DEB_ROOTS_nodejs=(nodejs ca-certificates netbase)
DEB_ROOTS_bench=(iperf3)
DEB_ASSUMED=(base-files debconf debianutils dpkg init-system-helpers install-info mawk perl-base sensible-utils tar)
# iperf3's maintainer scripts add a system user; adduser would bring PAM.
DEB_ASSUMED_bench=(adduser)
DEB_ARCH=amd64
# The wheels are for the guest's interpreter (CPython 3.11, glibc 2.36),
# whatever python the host runs.
PY_VERSION=3.11
PY_REQS=$SCRIPT_DIR/python3-requirements.txt
PIP_TARGET_FLAGS=(--only-binary=:all: --implementation cp --python-version "$PY_VERSION" --abi cp311
    --platform manylinux_2_36_x86_64 --platform manylinux2014_x86_64 --require-hashes -r "$PY_REQS")

deb_roots() {
    local -n roots="DEB_ROOTS_$VARIANT"
    printf '%s\n' "${roots[@]}"
}

deb_assumed() {
    printf '%s\n' "${DEB_ASSUMED[@]}"
    if [[ $VARIANT == bench ]]; then printf '%s\n' "${DEB_ASSUMED_bench[@]}"; fi
}

# Prints "package version arch" for the closure of the variant's roots,
# sorted. The answer is cached under the cache dir, keyed by the apt
# sources and the mtime/size of the package lists, so a cached image is
# found without running apt's solver (~3 s).
resolve_debs() {
    local LISTS="" memo_key memo_dir memo fake out
    eval "$(apt-config shell LISTS Dir::State::lists/d)"
    [[ -n $LISTS && -d $LISTS ]] || die "apt lists directory not found (apt-config Dir::State::lists)"
    memo_key=$(
        {
            echo "$VARIANT $DEB_ARCH"
            deb_roots
            echo "-- $(deb_assumed | tr '\n' ' ')"
            sha256sum "${BASH_SOURCE[0]}"
            cat /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true
            find "$LISTS" -maxdepth 1 -type f -name '*Packages*' -printf '%f %s %T@\n' | LC_ALL=C sort
        } | sha256sum | cut -c1-16
    )
    memo_dir=$CACHE_DIR/rootfs/resolved
    memo=$memo_dir/$VARIANT-$memo_key.list
    if [[ -s $memo ]]; then
        cat "$memo"
        return 0
    fi
    fake=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$fake'" RETURN
    # shellcheck disable=SC2046
    apt-cache show --no-all-versions $(deb_assumed) 2>/dev/null | awk '
        /^Package:/ { print; print "Status: install ok installed"; next }
        /^(Version|Architecture|Provides|Multi-Arch|Essential):/ { print; next }
        /^$/ { print }' >"$fake/status"
    local apt_opts=(-q -o "Dir::State::status=$fake/status" -o "APT::Architecture=$DEB_ARCH"
        -o "APT::Architectures=$DEB_ARCH" -o Debug::NoLocking=1)
    # shellcheck disable=SC2046
    if ! out=$(apt-get -s "${apt_opts[@]}" install --no-install-recommends $(deb_roots) 2>&1); then
        log "apt could not resolve $(deb_roots | tr '\n' ' '):"
        printf '%s\n' "$out" >&2
        return 1
    fi
    out=$(awk '/^Inst / {
            v = $3; if (v ~ /^\[/) v = $4; sub(/^\(/, "", v)
            a = ""; if (match($0, /\[[a-z0-9]+\]\)/)) a = substr($0, RSTART + 1, RLENGTH - 3)
            print $2, v, a }' <<<"$out" | LC_ALL=C sort)
    [[ -n $out ]] || die "apt resolved nothing for $(deb_roots | tr '\n' ' ')"
    awk 'NF != 3 { bad = 1 } END { exit bad }' <<<"$out" || die "cannot parse apt's resolution: $out"
    if mkdir -p "$memo_dir" 2>/dev/null && [[ -w $memo_dir ]]; then
        printf '%s\n' "$out" >"$memo.tmp.$$" && mv -f "$memo.tmp.$$" "$memo"
    fi
    printf '%s\n' "$out"
}

# The package lists may be missing (fresh container) or stale (a version
# withdrawn from the mirror): refresh them once, as root, and start over.
apt_update_and_restart() {
    if [[ $(id -u) == 0 && -z ${EMBER_ROOTFS_APT_UPDATED:-} ]]; then
        log "$1; running apt-get update and starting over"
        apt-get update >&2 || die "apt-get update failed"
        exec 9>&- # release the build lock (if held) before exec
        EMBER_ROOTFS_APT_UPDATED=1 exec bash "${BASH_SOURCE[0]}" "${ORIG_ARGS[@]}"
    fi
    die "$1 (run as root to let this script refresh the apt lists)"
}

deb_file() { printf '%s_%s_%s.deb' "$1" "${2//:/%3a}" "$3"; }

# Downloads the .debs of DEB_LIST that are not in the cache yet (apt checks
# them against the signed Release files).
fetch_debs() {
    local dir=$CACHE_DIR/rootfs/debs missing=() p v a tmp
    mkdir -p "$dir"
    while read -r p v a; do
        [[ -f $dir/$(deb_file "$p" "$v" "$a") ]] || missing+=("$p:$a=$v")
    done <<<"$DEB_LIST"
    ((${#missing[@]} == 0)) && return 0
    log "downloading ${#missing[@]} .debs into $dir"
    tmp=$(mktemp -d "$dir/.download.XXXXXX")
    if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >&2); then
        rm -rf "$tmp"
        return 1
    fi
    mv -f "$tmp"/*.deb "$dir"/
    rm -rf "$tmp"
    while read -r p v a; do
        [[ -f $dir/$(deb_file "$p" "$v" "$a") ]] || die "apt-get download did not leave $(deb_file "$p" "$v" "$a")"
    done <<<"$DEB_LIST"
}

host_pip() { PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 /usr/bin/python3 -m pip "$@"; }

# Installs the pinned wheels for the guest's python into $1, from the wheel
# cache; downloads them from PyPI first if the cache lacks them.
install_wheels() {
    local target=$1 dir=$CACHE_DIR/rootfs/wheels
    local install=(install --quiet --root-user-action=ignore --no-cache-dir --no-compile --no-warn-script-location
        --no-index --find-links "$dir" --target "$target" "${PIP_TARGET_FLAGS[@]}")
    mkdir -p "$dir"
    if ! host_pip "${install[@]}" >&2 2>/dev/null; then
        log "downloading wheels ($(grep -cE '^[A-Za-z]' "$PY_REQS") pinned in ${PY_REQS#"$REPO"/}) into $dir"
        host_pip download --quiet --no-cache-dir --dest "$dir" "${PIP_TARGET_FLAGS[@]}" >&2 ||
            die "pip download from PyPI failed"
        rm -rf "$target"
        host_pip "${install[@]}" >&2 || die "pip install --target $target failed"
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
        if [[ $VARIANT != base ]]; then
            echo "variant $VARIANT size $( ((AUTO_SIZE)) && echo auto || echo "${SIZE_MB}M")"
            printf '%s\n' "$DEB_LIST"
            if [[ $VARIANT == python3 ]]; then echo "python3-pip $(pkg_version python3-pip)"; fi
        fi
    ) | sha256sum | cut -c1-16
}

ORIG_ARGS=("$@")
ensure_packages
DEB_LIST=""
if [[ $VARIANT != base ]]; then
    DEB_LIST=$(resolve_debs) || apt_update_and_restart "apt could not resolve the $VARIANT packages"
fi
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
if [[ $VARIANT != base ]]; then
    [[ $(id -u) == 0 ]] || die "the $VARIANT variant must be built as root (dpkg -x ownership, chroot)"
    fetch_debs || apt_update_and_restart "downloading the $VARIANT .debs failed"
fi

# 1. The agent, statically linked (glibc static; no musl here). The explicit
#    --target keeps RUSTFLAGS away from build scripts and proc macros, and
#    the separate target dir keeps host builds untouched.
#    Cargo decides freshness by file times, so another checkout's build of
#    other sources (older files, newer output) in the same target dir would
#    pass for this one's: when the sources differ from the last build's,
#    the agent is cleaned first (its dependencies stay built).
command -v cargo >/dev/null || die "cargo not found in PATH"
log "building ember-agent (static, $TARGET)"
(
    cd "$REPO"
    export RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_TARGET_DIR="$CACHE_DIR/cargo-target-static" \
        CARGO_PROFILE_RELEASE_DEBUG=0 \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_PROFILE_RELEASE_LTO=true \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
    stamp=$CARGO_TARGET_DIR/.ember-agent-sources
    sources=$( (find guest-agent -type f ! -path '*/target/*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum; sha256sum Cargo.lock) | sha256sum | cut -c1-16)
    if [[ ! -f $stamp || $(cat "$stamp") != "$sources" ]]; then
        cargo clean --release -p ember-agent --target "$TARGET" >&2
    fi
    cargo build --release --locked -p ember-agent --bin ember-agent --target "$TARGET" >&2
    echo "$sources" >"$stamp"
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

# Runtime variants: the Debian packages, unpacked (see above for why dpkg -x).
stage_debs() {
    local dir=$CACHE_DIR/rootfs/debs p v a n=0
    while read -r p v a; do
        dpkg-deb -x "$dir/$(deb_file "$p" "$v" "$a")" "$STAGING" || die "dpkg-deb -x $p $v failed"
        n=$((n + 1))
    done <<<"$DEB_LIST"
    log "unpacked $n Debian packages ($(du -sm "$STAGING" | cut -f1) MiB)"
    # Documentation, manuals, translations, package-manager and desktop
    # integration: nothing in a function's guest reads them.
    (
        cd "$STAGING"
        rm -rf usr/share/doc usr/share/man usr/share/info usr/share/lintian usr/share/locale \
            usr/share/bug usr/share/menu usr/share/bash-completion usr/share/pixmaps \
            usr/share/applications usr/share/gcc usr/share/gdb usr/share/binfmts usr/share/debconf \
            usr/share/readline usr/share/python3/runtime.d usr/lib/valgrind etc/cron.daily etc/logrotate.d \
            usr/lib/python3.11/config-3.11-x86_64-linux-gnu
        # Tests shipped inside the stdlib (the test suite proper is a
        # separate package) and tkinter/IDLE leftovers without their libs.
        rm -rf usr/lib/python3.11/idlelib usr/lib/python3.11/tkinter usr/lib/python3.11/turtledemo \
            usr/lib/python3.11/lib2to3/tests usr/lib/python3.11/ctypes/test \
            usr/lib/python3.11/unittest/test usr/lib/python3.11/sqlite3/test
        # Node.js: TypeScript declarations and tracing probes, for tools.
        rm -rf usr/share/nodejs/@types usr/share/systemtap
    )
}

# Runtime variants: users, name service, CA bundle, the dynamic linker cache.
stage_runtime_etc() {
    (
        cd "$STAGING"
        # /var/task: the function's code (the agent mounts the code drive
        # there read-only); /opt: where Lambda puts layers. /tmp and /run
        # are tmpfs mounted by the agent (guest-agent/src/init.rs).
        mkdir -p var/task opt home
        chmod 0755 var var/task opt home
        # Lambda runs functions as sbx_user1051 (uid 993, gid 990). Its home
        # is /tmp, the only writable place for it (the root is read-only).
        cat >etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
sbx_user1051:x:993:990::/tmp:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
        cat >etc/group <<'GROUP'
root:x:0:
sbx_user1051:x:990:
nogroup:x:65534:
GROUP
        cat >etc/nsswitch.conf <<'NSS'
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:       files
ethers:         files
rpc:            files
NSS
        # No network set-up in the guest yet; a future one writes /run/resolv.conf.
        ln -sf /run/resolv.conf etc/resolv.conf
        chmod 0644 etc/passwd etc/group etc/nsswitch.conf
        # What update-ca-certificates (ca-certificates' postinst) would do:
        # every Mozilla certificate enabled, one bundle, NAME.pem links and
        # OpenSSL hash links for tools that use a CA directory.
        mkdir -p etc/ssl/certs
        local crt
        for crt in usr/share/ca-certificates/mozilla/*.crt; do
            [[ -f $crt ]] || die "ca-certificates: no certificates in $crt"
            ln -sf "/$crt" "etc/ssl/certs/$(basename "$crt" .crt).pem"
        done
        # The dynamic linker's cache: without it every library lookup probes
        # several directories, and every failed open costs a guest syscall.
        printf 'include /etc/ld.so.conf.d/*.conf\n' >etc/ld.so.conf
        chmod 0644 etc/ld.so.conf
    )
    chroot "$STAGING" /usr/bin/openssl rehash /etc/ssl/certs >&2 || die "openssl rehash failed"
    local crt bundle=$STAGING/etc/ssl/certs/ca-certificates.crt
    : >"$bundle"
    for crt in "$STAGING"/usr/share/ca-certificates/mozilla/*.crt; do
        sed -e '$a\' "$crt" >>"$bundle"
    done
    chmod 0644 "$bundle"
    ldconfig -X -r "$STAGING" || die "ldconfig -r $STAGING failed"
    log "CA bundle: $(grep -c 'BEGIN CERTIFICATE' "$STAGING/etc/ssl/certs/ca-certificates.crt") certificates"
}

# python3: awslambdaric and its dependencies in Debian's site directory for
# local installs, then the whole stdlib and site-packages compiled to .pyc.
# The root is read-only in the guest, so nothing could ever cache a .pyc
# there: every import of an uncompiled module would compile it again, at
# guest-syscall prices. unchecked-hash .pycs are used without comparing
# them to the source (the image never changes), so they do not depend on
# mkfs preserving mtimes either.
stage_python() {
    local site=usr/local/lib/python$PY_VERSION/dist-packages
    install_wheels "$STAGING/$site"
    rm -rf "${STAGING:?}/$site/bin"
    log "wheels: $(cd "$STAGING/$site" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||' | tr '\n' ' ')"
    chroot "$STAGING" /usr/bin/python3 -m compileall -q -f --invalidation-mode unchecked-hash \
        -x '/(test|tests)/(bad|badsyntax|tokenizedata)' \
        "/usr/lib/python$PY_VERSION" /usr/lib/python3 "/$site" >&2 ||
        die "compileall failed in the staging tree"
    local py pyc
    py=$(find "$STAGING/usr/lib/python$PY_VERSION" "$STAGING/usr/lib/python3" "$STAGING/$site" -name '*.py' | wc -l)
    pyc=$(find "$STAGING/usr/lib/python$PY_VERSION" "$STAGING/usr/lib/python3" "$STAGING/$site" -name '*.pyc' | wc -l)
    log "python: $py .py files, $pyc .pyc files"
}

# nodejs: Ember's runtime interface client (plain CommonJS, Node's own
# modules only), where Lambda's images keep theirs out of /var/task.
stage_nodejs() {
    install -d -m 0755 "$STAGING/usr/lib/ember"
    install -m 0644 "$SCRIPT_DIR/nodejs/ric.js" "$STAGING/usr/lib/ember/ric.js"
}

# Every ELF executable and shared library in the tree must find all its
# libraries inside the tree (checked with the tree's own dynamic linker).
check_libraries() {
    local report
    report=$(chroot "$STAGING" /bin/sh -c '
        ld=/lib64/ld-linux-x86-64.so.2
        find /bin /sbin /usr/bin /usr/sbin /lib /usr/lib $(ls -d /usr/local 2>/dev/null) -type f \( -perm -u+x -o -name "*.so*" \) |
        while read -r f; do
            $ld --verify "$f" >/dev/null 2>&1 || continue
            missing=$($ld --list "$f" 2>&1 | grep "not found")
            [ -z "$missing" ] || echo "$f: $missing"
        done') || die "library check failed to run"
    [[ -z $report ]] || die "unresolved libraries in the $VARIANT tree:"$'\n'"$report"
}

# The tree's own programs run (in a chroot) before it becomes an image.
smoke_test() {
    local out
    case $VARIANT in
    provided)
        out=$(chroot "$STAGING" /bin/bash -c 'echo "bash $BASH_VERSION"; curl --version | head -n1') ||
            die "bash/curl do not run in the staging tree"
        ;;
    bench)
        out=$(chroot "$STAGING" /usr/bin/iperf3 --version | head -n1) ||
            die "iperf3 does not run in the staging tree"
        ;;
    python3)
        out=$(chroot "$STAGING" /usr/bin/python3 -B -c '
import sys, ssl, json, sqlite3, ctypes, zoneinfo, awslambdaric, awslambdaric.bootstrap, runtime_client
print("python", sys.version.split()[0], "awslambdaric", awslambdaric.__version__, ssl.OPENSSL_VERSION)
assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 100, "no CA certificates"') ||
            die "python3/awslambdaric do not work in the staging tree"
        ;;
    nodejs)
        # Loading the client as a module defines it without starting it.
        out=$(chroot "$STAGING" /usr/bin/node -e '
const ric = require("/usr/lib/ember/ric.js");
if (typeof ric.run !== "function") throw new Error("ric.js exports no run()");
const v = process.versions;
console.log("node", v.node, "openssl", v.openssl, "icu", v.icu,
    "CA certificates", require("tls").rootCertificates.length);
if (typeof fetch !== "function") throw new Error("no fetch (undici)");') ||
            die "node/ric.js do not work in the staging tree"
        ;;
    esac
    log "smoke test: $(tr '\n' ';' <<<"$out")"
}

# 2. Staging tree (for provided/python3: the Debian packages first, so
#    busybox fills in only the commands they do not provide).
STAGING=$(mktemp -d "$CACHE_DIR/rootfs/.staging.XXXXXX")
TMP_IMG=""
cleanup() {
    rm -rf "$STAGING"
    if [[ -n $TMP_IMG ]]; then rm -f "$TMP_IMG"; fi
}
trap cleanup EXIT
chmod 0755 "$STAGING"
if [[ $VARIANT != base ]]; then stage_debs; fi
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
if [[ $VARIANT == bench ]]; then
    ldconfig -X -r "$STAGING" || die "ldconfig -r $STAGING failed"
elif [[ $VARIANT != base ]]; then
    stage_runtime_etc
    if [[ $VARIANT == python3 ]]; then stage_python; fi
    if [[ $VARIANT == nodejs ]]; then stage_nodejs; fi
fi
if [[ $VARIANT != base ]]; then
    check_libraries
    smoke_test
fi

# 3. The image. No journal (the rootfs is per-VM and disposable, and every
#    guest kernel cycle is expensive here); inode tables initialised now,
#    not lazily by a guest kernel thread; everything owned by root.
#    provided/python3 are sized to their content (they are read-only in
#    the guest): the data in 4 KiB blocks, 256-byte inodes for every file
#    and a quarter more, 5% and 4 MiB for the rest of the metadata.
INODE_ARGS=()
if ((AUTO_SIZE)); then
    DATA_KB=$(du -s --block-size=4K "$STAGING" | cut -f1)
    DATA_KB=$((DATA_KB * 4))
    NFILES=$(find "$STAGING" | wc -l)
    INODES=$(((NFILES * 5 / 4 + 1023) / 1024 * 1024))
    SIZE_MB=$(((DATA_KB * 105 / 100 + INODES / 4) / 1024 + 4))
    INODE_ARGS=(-N "$INODES")
    log "content: $((DATA_KB / 1024)) MiB in $NFILES files"
fi
mkdir -p "$OUT_DIR"
TMP_IMG=$(mktemp "$OUT_DIR/.rootfs.ext4.XXXXXX")
log "creating ${SIZE_MB} MiB ext4 image"
mkfs.ext4 -q -F -t ext4 -b 4096 -m 0 -L ember-root \
    -O ^has_journal "${INODE_ARGS[@]}" \
    -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 \
    -d "$STAGING" "$TMP_IMG" "${SIZE_MB}M" >&2
if [[ $VARIANT != base ]]; then
    log "image: $(dumpe2fs -h "$TMP_IMG" 2>/dev/null | awk -F: '
        /^Block count/ { b = $2 } /^Free blocks/ { f = $2 }
        /^Inode count/ { i = $2 } /^Free inodes/ { fi = $2 }
        END { printf "%d of %d blocks free, %d of %d inodes free", f, b, fi, i }')"
fi
chmod 0644 "$TMP_IMG"
INIT_STAT=$(debugfs -R 'stat /sbin/init' "$TMP_IMG" 2>/dev/null || true)
[[ $INIT_STAT == *"Type: regular"* ]] || die "/sbin/init missing from the image"
mv -f "$TMP_IMG" "$OUT"
TMP_IMG=""

END=$(date +%s.%N)
log "built $OUT in $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }') s"
echo "$OUT"
