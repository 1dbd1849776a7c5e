#!/usr/bin/env bash
# Installs, with apt, the Debian packages providing the tools named as
# TOOL:PACKAGE arguments, for those tools not found in PATH.
set -euo pipefail
need=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
[[ ${#need[@]} -eq 0 ]] && exit 0
[[ $(id -u) == 0 ]] || { echo "ensure-packages: need root to install ${need[*]}" >&2; exit 1; }
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
pkgs=$(printf '%s\n' "${need[@]}" | sort -u)
# shellcheck disable=SC2086
apt-get install -y -qq $pkgs >&2 ||
    { apt-get update -qq >&2 && apt-get install -y -qq $pkgs >&2; }
