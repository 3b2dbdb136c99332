"""The unit suite pins itself to the CPU (tests/conftest.py) unless MIMO_RAY_TEST_DEVICE=cuda."""

import os
import subprocess
import sys

import torch


def test_cuda_is_hidden_for_cpu_runs():
    assert os.environ.get("MIMO_RAY_TEST_DEVICE", "cpu") == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    # Processes the tests start (Ray workers, probes) inherit the pin.
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
