#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
.venv/bin/python -m ruff check .
# Two workers, whole files each (module fixtures stay in one process): much of the suite waits on Ray start-up,
# subprocesses and actors rather than computing, so two workers share the 2 CPU cores of a CI machine well.
# MIMO_TEST_WORKERS=0 runs in one process.
workers=${MIMO_TEST_WORKERS:-2}
dist=()
if [ "$workers" != "0" ]; then dist=(-n "$workers" --dist loadfile); fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${dist[@]}" "$@"
