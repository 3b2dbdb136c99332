#!/usr/bin/env bash
# Creates .venv and installs mimo_ray with everything it needs; idempotent (skips when already installed).
# CPU machines get the torch 2.13.0 CPU wheel (never the CUDA build, never transformer-engine); a machine whose
# python3 already has a CUDA torch keeps it (the venv sees the system site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.mimo_ray-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[setup] system torch has CUDA: keeping it"
  "$PY" -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
else
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first (or in the same resolve) so megatron-core's torch>=2.6 is met by the local CPU wheel.
  .venv/bin/python -m pip install -q 'torch==2.13.0'
  .venv/bin/python -m pip install -q -e '.[cpu,test]'
fi
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, ray, megatron.core as m; print("torch", torch.__version__, "ray", ray.__version__, "megatron-core", m.__version__)')"
