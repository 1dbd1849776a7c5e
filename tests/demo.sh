#!/usr/bin/env bash
# Ember's main job, end to end: build the guest kernel and the python3 root
# filesystem (cached), start the host daemon emberd, create a Python
# function (emberd boots it once in a microVM, lets its runtime initialise
# and snapshots it), then invoke it: each invocation runs in a microVM
# restored from that snapshot (the first restores a clone, later ones reuse
# the warm instance).
# Usage: tests/demo.sh [payload JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
payload='{"name": "Ember"}'
[ "$#" -gt 0 ] && payload="$1"

# protoc builds the etcd client in emberd; ip and nft set up instance networks.
bash tests/ensure-packages.sh protoc:protobuf-compiler ip:iproute2 nft:nftables
kernel="$(bash kernels/build.sh)"
rootfs_python3="$(bash rootfs/build.sh python3)"
rootfs_provided="$(bash rootfs/build.sh provided)"
cargo build --release -q --bin emberd --bin ember --bin ember-vmm --bin ember-jailer
bin="${CARGO_TARGET_DIR:-target}/release"

work="$(mktemp -d /tmp/ember-demo.XXXXXX)"
trap 'kill "${emberd_pid:-}" 2>/dev/null && wait "${emberd_pid:-}" 2>/dev/null; rm -rf "$work"' EXIT
jail=()
[ "$(id -u)" = 0 ] || jail=(--no-jail --no-network)
"$bin/emberd" --socket "$work/emberd.sock" --state-dir "$work/state" --run-dir "$work/run" \
    --kernel "$kernel" --rootfs-python3 "$rootfs_python3" --rootfs-provided "$rootfs_provided" \
    "${jail[@]}" 2> "$work/emberd.log" &
emberd_pid=$!
for _ in $(seq 100); do [ -S "$work/emberd.sock" ] && break; sleep 0.1; done
ember() { "$bin/ember" --socket "$work/emberd.sock" "$@"; }

mkdir "$work/code"
cat > "$work/code/app.py" <<'PY'
import os, platform

def handler(event, context):
    print(f"hello from request {context.aws_request_id}")
    return {
        "greeting": f"Hello, {event.get('name', 'world')}!",
        "function": context.function_name,
        "kernel": platform.release(),
        "uid": os.getuid(),
    }
PY

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { printf '%d.%03d s' $(($1 / 1000)) $(($1 % 1000)); }
echo "creating function 'hello' (python3.11): boot, runtime init and snapshot; on nested KVM this takes a minute or two..." >&2
t=$(now_ms)
if ! ember create hello --runtime python3.11 --handler app.handler --code "$work/code" --timeout 30 > "$work/create.json"; then
    echo "creating the function failed:" >&2
    cat "$work/create.json" >&2; tail -20 "$work/emberd.log" >&2
    exit 1
fi
echo "function active after $(secs $(( $(now_ms) - t ))) (runtime init took $(grep -o '"InitDurationMs": [0-9]*' "$work/create.json" | grep -o '[0-9]*$') ms before the snapshot)" >&2
for i in 1 2 3; do
    t=$(now_ms)
    ember invoke hello --payload "$payload" --log
    echo "--- invocation $i: $(secs $(( $(now_ms) - t )))" >&2
done
