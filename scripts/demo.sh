#!/usr/bin/env bash
# The main job on a fresh CPU machine: set up, make a synthetic audio-video data set, train the tiny model on
# embedded Ray (encoder and LM actor groups), run batched inference on the val split and print answer accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
exec .venv/bin/python jobs/demo.py "$@"
