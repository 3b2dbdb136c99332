#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
.venv/bin/python -m ruff check .
# Byte-compile our own sources once: with PYTHONDONTWRITEBYTECODE=1 (our machines and CI) Python never caches them,
# and each of the suite's few hundred Ray worker processes compiled mimo_ray again (~0.2 s each). Stale .pyc files
# are harmless: Python checks the source's mtime and recompiles in memory.
.venv/bin/python -m compileall -q -j 0 mimo_ray jobs examples datasets > /dev/null
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
