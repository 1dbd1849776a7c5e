#!/usr/bin/env bash
# Prints the path of a Python with the packages of
# tests/python-requirements.txt (unmodified AWS clients for the tests),
# from a virtualenv cached under $EMBER_CACHE_DIR by the requirements' hash.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE_DIR="${EMBER_CACHE_DIR:-/var/cache/ember}"
key=$( (sha256sum tests/python-requirements.txt tests/python-env.sh; python3 --version) | sha256sum | cut -c1-16)
venv="$CACHE_DIR/python-env/$key"
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null ||
        bash tests/ensure-packages.sh __python3-venv:python3-venv
    rm -rf "$venv.tmp"
    python3 -m venv "$venv.tmp" >&2
    "$venv.tmp/bin/pip" install -q --disable-pip-version-check -r tests/python-requirements.txt >&2
    rm -rf "$venv"
    mv "$venv.tmp" "$venv"
    # The venv's scripts name their interpreter by path: fix them after the
    # move (regular files only: bin/ also holds symlinks and __pycache__).
    find "$venv/bin" -maxdepth 1 -type f -exec sed -i "1s|$venv.tmp|$venv|" {} +
fi
echo "$venv/bin/python"
