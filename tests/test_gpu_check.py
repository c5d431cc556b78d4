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


def test_the_gpu_test_files_it_runs_hold_gpu_tests():
    """Each file gpu_check.sh hands to ``pytest -m gpu`` contributes GPU-marked tests."""
    text = SCRIPT.read_text()
    block = text[text.index("GPU_TESTS=(") + len("GPU_TESTS=("):]
    files = [w for w in block[:block.index(")")].split() if w.endswith(".py")]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "-p", "no:cacheprovider", *files], capture_output=True, text=True,
                         cwd=SCRIPT.parents[1], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for f in files:
        assert f"{f}::" in res.stdout, f


def test_the_sanitizer_driver_cases_hold_on_the_cpp_kernels():
    """benchmarks/sanitize_kernels.py's checks, on a sample of its cases with the C++ kernels (a
    wrong expectation there would fail the GPU run for nothing)."""
    from ofmu import backends

    if backends.probe("cpp")[0] is None:
        pytest.skip("ofmu._C not built")
    import runpy

    mod = runpy.run_path(str(SCRIPT.parent / "sanitize_kernels.py"))
    cases = list(mod["cases"](True))
    assert len(cases) == 210
    for case in cases[::9]:
        assert mod["one_case"](*case, dev="cpu") == 5
