"""``benchmarks/gpu_check.sh``, the GPU machine's check of every ``--device cuda`` path: its
syntax, and on a machine without a GPU the one line that says so (exit code 2) before any
step runs. (``DEVICE=cpu benchmarks/gpu_check.sh`` runs every step on the CPU: about two
minutes, too long for the suite; run by hand after changing it.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    results = tmp_path / "gpu_check.json"
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cuda", "RESULTS": str(results)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "torch sees no GPU" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not results.exists()
