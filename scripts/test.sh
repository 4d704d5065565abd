#!/usr/bin/env bash
# The README's second command (and CI's, via .ci/run): install what the tests need and run them.
# Real servers: redis-server from Debian's packages, moto_server (S3) from PyPI; the tests start
# and stop them on free loopback ports themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# torch 2.13.0 (CPU build) first, so the extras never pull a CUDA build from the registry.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"

python3 -m pytest -q "$@"
