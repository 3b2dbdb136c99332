#!/usr/bin/env bash
# Creates .venv and installs mimo_ray with everything it needs; idempotent (skips when already installed).
# CPU machines get the torch 2.13.0 CPU wheel (never the CUDA build, never transformer-engine); a machine whose
# python3 already has a CUDA torch (and a GPU) keeps it (the venv sees the system site-packages).
#
# Where a CPU machine's torch comes from:
#   TORCH_INDEX_URL set      pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0 (set but empty: plain pip)
#   otherwise                the PyTorch CPU index ($MIMO_TORCH_CPU_INDEX, default below) when it answers; else
#                            plain `pip install torch==2.13.0` through pip's own configuration (a local registry or
#                            wheel folder that holds the CPU wheel, as on our machines and CI)
# Either way the installed torch must be a CPU build (torch.version.cuda is None), or set-up fails and says why.
#
#   PYTHON=...               interpreter the venv is made from (default python3)
#   MIMO_SETUP_DRY_RUN=1     print the commands instead of running them (ignores an existing install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=2.13.0
CPU_INDEX=${MIMO_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
DRY=${MIMO_SETUP_DRY_RUN:-}
VPY=.venv/bin/python
stamp=.venv/.mimo_ray-installed

# Runs a command, or prints it in a dry run.
run() {
  if [ -n "$DRY" ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Whether a package index answers (a PEP 503 page for torch) within a few seconds.
index_answers() {
  "$PY" - "$1/torch/" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as page:
    sys.exit(0 if page.status == 200 else 1)
EOF
}

# Fails loudly unless the venv's torch is a CPU build.
check_cpu_torch() {
  if [ -n "$DRY" ]; then
    echo "+ check: $VPY has torch $TORCH_PIN with torch.version.cuda None"
    return
  fi
  local found
  found=$("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)')
  if [ "${found##* }" != "None" ]; then
    echo "[setup] ERROR: the torch installed in .venv is a CUDA build ($found), not the CPU wheel." >&2
    echo "[setup]   pip's index gave a CUDA torch $TORCH_PIN. Remove .venv and rerun with the PyTorch CPU index:" >&2
    echo "[setup]   rm -rf .venv && TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
    exit 1
  fi
  echo "[setup] torch $found: CPU build"
}

# pip byte-compiles what it installs (the default, kept on purpose): with PYTHONDONTWRITEBYTECODE=1, as on our
# machines and CI, Python never caches bytecode itself, and without pip's .pyc files every stage process compiled
# torch and megatron from source (measured: the suite took 1001 s instead of 549 s with --no-compile).
if [ -z "$DRY" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[setup] system torch has CUDA: keeping it"
  run "$PY" -m venv --system-site-packages .venv
  run "$VPY" -m pip install -q --upgrade pip
  run "$VPY" -m pip install -q -e '.[test]'
else
  if [ "${TORCH_INDEX_URL+set}" = set ]; then
    index=$TORCH_INDEX_URL
    shown=${index:-"<empty: pip's own configuration>"}
    echo "[setup] torch from TORCH_INDEX_URL=$shown"
  elif index_answers "$CPU_INDEX"; then
    index=$CPU_INDEX
    echo "[setup] torch from the PyTorch CPU index $index"
  else
    index=
    echo "[setup] $CPU_INDEX does not answer: torch $TORCH_PIN through pip's own configuration"
  fi
  torch_args=("torch==$TORCH_PIN")
  if [ -n "$index" ]; then
    torch_args=(--index-url "$index" "${torch_args[@]}")
  fi
  run "$PY" -m venv .venv
  run "$VPY" -m pip install -q --upgrade pip
  # torch first (or in the same resolve) so megatron-core's torch>=2.6 is met by the CPU wheel.
  run "$VPY" -m pip install -q "${torch_args[@]}"
  run "$VPY" -m pip install -q -e '.[cpu,test]'
  check_cpu_torch
fi
if [ -n "$DRY" ]; then
  exit 0
fi
touch "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, ray, megatron.core as m; print("torch", torch.__version__, "ray", ray.__version__, "megatron-core", m.__version__)')"
