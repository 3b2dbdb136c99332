"""``scripts/setup.sh`` picks where torch comes from and refuses a CUDA torch on a CPU machine.

The script runs for real (bash) in a copy of the repository's ``scripts/`` with ``PYTHON`` pointing at a shim: the
real interpreter with a stand-in ``torch`` package (CPU, or CUDA build with or without a GPU), whose ``-m venv``
makes the shim the venv's python and whose ``-m pip`` only logs its arguments. The PyTorch CPU index is a page
served on loopback, or a closed loopback port where it must not answer.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SHIM = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p .venv/bin && cp "$0" .venv/bin/python && exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "pip $*" >> "$SHIM_LOG"; exit 0; fi
PYTHONPATH="$SHIM_TORCH" exec "$SHIM_REAL_PYTHON" "$@"
"""

FAKE_TORCH = """__version__ = {version!r}
class version:
    cuda = {cuda!r}
class cuda:
    @staticmethod
    def is_available():
        return {gpu!r}
"""

TORCHES = {
    "cpu": {"version": "2.13.0+cpu", "cuda": None, "gpu": False},
    "cuda-no-gpu": {"version": "2.13.0", "cuda": "12.8", "gpu": False},  # what a bare pin gives on a stock box
    "cuda-gpu": {"version": "2.13.0+cu128", "cuda": "12.8", "gpu": True},
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder with ``scripts/setup.sh`` and a ``pyproject.toml``, where the script makes its ``.venv``."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return root


@pytest.fixture
def cpu_index(tmp_path: Path) -> Iterator[str]:
    """URL of a package index on loopback with a page for torch."""
    pages = tmp_path / "index"
    (pages / "whl" / "cpu" / "torch").mkdir(parents=True)
    (pages / "whl" / "cpu" / "torch" / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")
    handler = functools.partial(QuietHandler, directory=str(pages))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dead_index() -> str:
    """URL on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def run_setup(root: Path, torch: str, index: str, *, dry: bool = True, **env: str) -> tuple[int, str, list[str]]:
    """Runs setup.sh with the shim; returns ``(exit code, stdout + stderr, the pip command lines)``."""
    fake = root.parent / f"torch-{torch}"
    (fake / "torch").mkdir(parents=True, exist_ok=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH.format(**TORCHES[torch]))
    shim = root.parent / "python-shim"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    log = root.parent / "pip.log"
    log.write_text("")
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "MIMO_SETUP_DRY_RUN")}
    environ |= {"PYTHON": str(shim), "SHIM_TORCH": str(fake), "SHIM_REAL_PYTHON": sys.executable,
                "SHIM_LOG": str(log), "MIMO_TORCH_CPU_INDEX": index, **env}  # fmt: skip
    if dry:
        environ["MIMO_SETUP_DRY_RUN"] = "1"
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=environ, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return done.returncode, done.stdout + done.stderr, log.read_text().splitlines()


def pip_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("+") and " -m pip " in line]


def test_cpu_machine_takes_torch_from_the_cpu_index_when_it_answers(checkout, cpu_index) -> None:
    code, out, _ = run_setup(checkout, "cpu", cpu_index)
    assert code == 0, out
    assert pip_lines(out) == [
        "+ .venv/bin/python -m pip install -q --upgrade pip",
        f"+ .venv/bin/python -m pip install -q --index-url {cpu_index} torch==2.13.0",
        "+ .venv/bin/python -m pip install -q -e .\\[cpu\\,test\\]",
    ]
    assert "+ check: .venv/bin/python has torch 2.13.0 with torch.version.cuda None" in out
    assert not (checkout / ".venv").exists()  # a dry run makes nothing


def test_cpu_machine_without_the_cpu_index_uses_pips_own_configuration(checkout, dead_index) -> None:
    code, out, _ = run_setup(checkout, "cpu", dead_index)
    assert code == 0, out
    assert f"{dead_index} does not answer" in out
    assert "+ .venv/bin/python -m pip install -q torch==2.13.0" in pip_lines(out)
    assert "--index-url" not in out


def test_torch_index_url_overrides_the_probe(checkout, cpu_index) -> None:
    code, out, _ = run_setup(checkout, "cpu", cpu_index, TORCH_INDEX_URL="https://mirror.invalid/cpu")
    assert code == 0, out
    assert "+ .venv/bin/python -m pip install -q --index-url https://mirror.invalid/cpu torch==2.13.0" in out
    code, out, _ = run_setup(checkout, "cpu", cpu_index, TORCH_INDEX_URL="")  # set but empty: plain pip
    assert code == 0, out
    assert "+ .venv/bin/python -m pip install -q torch==2.13.0" in pip_lines(out)
    assert "--index-url" not in out


def test_a_cuda_torch_with_a_gpu_is_kept_and_no_cpu_wheel_is_asked_for(checkout, cpu_index) -> None:
    code, out, _ = run_setup(checkout, "cuda-gpu", cpu_index)
    assert code == 0, out
    assert "system torch has CUDA: keeping it" in out
    assert "--system-site-packages" in out
    assert pip_lines(out) == [
        "+ .venv/bin/python -m pip install -q --upgrade pip",
        "+ .venv/bin/python -m pip install -q -e .\\[test\\]",
    ]
    assert "torch==" not in out and "--index-url" not in out and "[cpu" not in out.replace("\\", "")


def test_a_cuda_torch_installed_on_a_cpu_machine_fails_loudly(checkout, dead_index) -> None:
    # Real run: the shim's pip "installs" nothing, so the venv's torch is the stand-in CUDA build.
    code, out, pips = run_setup(checkout, "cuda-no-gpu", dead_index, dry=False)
    assert code == 1
    assert "ERROR: the torch installed in .venv is a CUDA build (2.13.0 12.8), not the CPU wheel" in out
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" in out
    assert pips == ["pip install -q --upgrade pip", "pip install -q torch==2.13.0", "pip install -q -e .[cpu,test]"]
    assert not (checkout / ".venv" / ".mimo_ray-installed").exists()  # not marked installed: the next run retries


def test_a_cpu_torch_passes_the_check(checkout, dead_index) -> None:
    code, out, _ = run_setup(checkout, "cpu", dead_index, dry=False)
    assert code == 0, out
    assert "[setup] torch 2.13.0+cpu None: CPU build" in out
    assert "ERROR" not in out
    assert (checkout / ".venv" / ".mimo_ray-installed").exists()
