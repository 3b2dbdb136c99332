#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
