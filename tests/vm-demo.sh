#!/usr/bin/env bash
# A bare microVM, end to end (the VMM without the host daemon): build the guest kernel and
# root filesystem (cached), boot a microVM with ember-vmm, wait for the guest
# agent, run a command inside the guest, then reboot the guest, which ends
# the VMM. Usage: tests/vm-demo.sh [command in the guest...]
set -euo pipefail
cd "$(dirname "$0")/.."
export EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
[ "$#" -gt 0 ] || set -- /bin/sh -c 'uname -a; echo "vCPUs: $(grep -c ^processor /proc/cpuinfo)"; cat /proc/uptime'

kernel="$(bash kernels/build.sh)"
rootfs="$(bash rootfs/build.sh)"
cargo build --release -q --bin ember-vmm --bin ember-agentctl
bin="${CARGO_TARGET_DIR:-target}/release"

work="$(mktemp -d /tmp/ember-demo.XXXXXX)"
trap 'kill "${vmm_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/vm.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$kernel",
                  "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
  "drives": [{"drive_id": "rootfs", "path_on_host": "$rootfs", "is_root_device": true, "is_read_only": true}],
  "vsock": {"guest_cid": 3, "uds_path": "$work/vsock.sock"}
}
JSON

start_ms=$(( $(date +%s%N) / 1000000 ))
# The ready listener must exist before the guest boots.
"$bin/ember-agentctl" --uds "$work/vsock.sock" wait-ready > "$work/ready.json" &
ready_pid=$!
sleep 0.2
"$bin/ember-vmm" --config-file "$work/vm.json" --serial-out "$work/serial.log" 2> "$work/vmm.log" &
vmm_pid=$!
echo "booting microVM (pid $vmm_pid); on nested KVM this takes about a minute..." >&2
if ! wait "$ready_pid"; then
    echo "the guest agent did not come up; VMM log and console tail:" >&2
    tail -5 "$work/vmm.log" >&2; tail -20 "$work/serial.log" >&2
    exit 1
fi
elapsed_ms=$(( $(date +%s%N) / 1000000 - start_ms ))
echo "agent ready after $((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000))) s: $(cat "$work/ready.json")" >&2
echo "--- running in the guest: $*" >&2
rc=0
"$bin/ember-agentctl" --uds "$work/vsock.sock" exec "$@" || rc=$?
echo "--- exit code $rc; rebooting the guest" >&2
"$bin/ember-agentctl" --uds "$work/vsock.sock" reboot
wait "$vmm_pid" && echo "VMM exited cleanly" >&2
vmm_pid=
exit "$rc"
