"""Every CUDA source under csrc/cuda compiles with a bare ``nvcc -c`` for sm_90, and for the
oldest architecture of the default build list (sm_75: Turing, CUDA 13's lowest).

The kernels are torch-free (plain pointers and sizes), so this takes seconds and runs on a
machine without a GPU or a CUDA build of torch; the torch glue is linked only by setup.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = _nvcc()

# What torch's BuildExtension adds to every nvcc command (no implicit half/bf16 conversions or
# operators), so a source that compiles here also compiles inside setup.py.
try:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as TORCH_NVCC_FLAGS
except ImportError:  # pragma: no cover - torch is a dependency
    TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                        "--expt-relaxed-constexpr"]
FLAGSETS = {"bare": [], "torch-flags": list(TORCH_NVCC_FLAGS)}


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("flagset", FLAGSETS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, flagset, tmp_path):
    # Warnings are errors; ptxas is also asked to warn about register spills.
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-arch=sm_90", *FLAGSETS[flagset],
           "--Werror", "all-warnings", "-Xptxas", "-warn-spills",
           str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_for_the_oldest_default_architecture(src, tmp_path):
    """The default list starts at 7.5; bf16/fp16 code that needs a newer GPU fails here."""
    from ofmu import cuda_arch

    oldest = min((t for t in cuda_arch.build_targets({})[0] if t.startswith("sm_")),
                 key=lambda t: cuda_arch.split_target(t)[1:3])
    assert oldest == "sm_75"
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, *cuda_arch.gencode_flags([oldest]),
           "--Werror", "all-warnings", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
