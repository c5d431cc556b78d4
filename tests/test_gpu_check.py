"""benchmarks/gpu_check.sh cannot pass without a GPU: it stops at once, non-zero, saying why
(before, every GPU test skipped and the check looked green)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_fails_at_once_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": sys.executable})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device visible" in res.stderr and "nothing was run" in res.stderr
    # nothing else ran: no build, no test log, only the one-line summary saying why
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]
    assert "this check needs a GPU" in (out / "summary.txt").read_text()
