#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60) on its
# committed corpus, one at a time; prints a table and exits non-zero on
# any crash, OOM (-rss_limit_mb=512) or timeout. See fuzz/README.md.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]
#
# Crashing inputs land in fuzz/artifacts/<target>/ (not committed). New
# inputs go to $EMBER_CACHE_DIR/fuzz-corpus/<target>/, read along with the
# committed fuzz/corpus/<target>/; FUZZ_UPDATE_CORPUS=1 merges them back
# into fuzz/corpus (minimized by libFuzzer's -merge).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${EMBER_CACHE_DIR:-/var/cache/ember}"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(conntrack migration snapshot agent_frame virtio_block virtio_net virtio_vsock sigv4 nbd nbd_wire)

# -max_len per target: a real snapshot file is ~26 KB; frames, queues,
# requests and NBD sessions are small.
declare -A max_len=(
    [conntrack]=16384 [migration]=65536 [snapshot]=65536 [agent_frame]=16384
    [virtio_block]=16384 [virtio_net]=16384 [virtio_vsock]=16384
    [sigv4]=8192 [nbd]=16384 [nbd_wire]=4096
)

# --- install what is missing ---
# libfuzzer-sys compiles libFuzzer (C++); virtio_net needs ip(8); etcd-client
# (under the cluster and volumed crates of sigv4 and nbd) needs protoc.
bash "$here/../tests/ensure-packages.sh" c++:g++ ip:iproute2 protoc:protobuf-compiler
fuzz_root="$cache/cargo-fuzz"
if ! [ -x "$fuzz_root/bin/cargo-fuzz" ]; then
    CARGO_TARGET_DIR="$cache/cargo-fuzz-build" \
        cargo install --locked cargo-fuzz --version 0.13.2 --root "$fuzz_root"
fi
export PATH="$fuzz_root/bin:$PATH"

# --- build ---
# Stable rustc: no sanitizer (-Zsanitizer is nightly-only); cargo-fuzz's
# other flags (sancov passes, llvm-args, --cfg fuzzing) are all stable.
tdir="$cache/fuzz-target"
cd "$here"
for t in "${targets[@]}"; do
    cargo fuzz build --sanitizer none --target-dir "$tdir" "$t"
done
bindir="$tdir/x86_64-unknown-linux-gnu/release"

# --- run ---
logs="$cache/fuzz-logs"
mkdir -p "$logs"
fail=0
rows=()
for t in "${targets[@]}"; do
    if [ "$t" = virtio_net ] && [ "$(id -u)" != 0 ]; then
        rows+=("$t|skipped: needs root (a network namespace with a tap)|-|-|-")
        continue
    fi
    work="$cache/fuzz-corpus/$t"
    art="$here/artifacts/$t"
    mkdir -p "$work" "$art" "$here/corpus/$t"
    before=$(find "$art" -type f | wc -l)
    log="$logs/$t.log"
    rc=0
    "$bindir/$t" -max_total_time="$secs" -rss_limit_mb=512 \
        -max_len="${max_len[$t]}" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$art/" "$work" "$here/corpus/$t" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corp=$(grep -o 'corp: [0-9]*/[0-9a-zA-Z]*' "$log" | tail -1 | sed 's/corp: //')
    crashes=$(grep -c -E 'ERROR: libFuzzer: (deadly signal|fuzz target exited)|panicked at' "$log" || true)
    ooms=$(grep -c -E 'ERROR: libFuzzer: (out-of-memory|timeout|malloc)' "$log" || true)
    after=$(find "$art" -type f | wc -l)
    if [ "$rc" != 0 ] || [ "$after" -gt "$before" ]; then
        fail=1
        [ "$crashes" != 0 ] || [ "$ooms" != 0 ] || crashes="exit $rc"
        echo "== $t failed (exit $rc); its log: $log; inputs in $art" >&2
        grep -E -m5 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
    fi
    rows+=("$t|${execs:-?}|$crashes|$ooms|${corp:-?}")
    if [ "${FUZZ_UPDATE_CORPUS:-0}" = 1 ] && [ "$rc" = 0 ]; then
        "$bindir/$t" -merge=1 -max_len="${max_len[$t]}" -rss_limit_mb=512 \
            "$here/corpus/$t" "$work" >>"$log" 2>&1
    fi
done

printf '\nfuzzing, %s s per target (logs in %s)\n' "$secs" "$logs"
printf '%-14s %14s %8s %14s %14s\n' target executions crashes ooms/timeouts 'corpus (n/size)'
for r in "${rows[@]}"; do
    IFS='|' read -r t e c o n <<<"$r"
    printf '%-14s %14s %8s %14s %14s\n' "$t" "$e" "$c" "$o" "$n"
done
exit "$fail"
