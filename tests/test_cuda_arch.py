"""Which GPU architectures a CUDA build covers: the flags setup.py passes to nvcc for a given
environment, and the run-time refusal of the cuda backend on a GPU the build does not cover.
All on CPU: the device's compute capability is a stand-in."""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import torch
from ofmu import backend_info, backends, cuda_arch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
# What CUDA 13.0's `nvcc --list-gpu-code` prints.
NVCC13 = "sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_110 sm_103 sm_120 sm_121".split()


def torch_flags(arch_list: str, monkeypatch) -> list[str]:
    """torch's own reading of TORCH_CUDA_ARCH_LIST: the independent reference for the flags."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    return cpp_extension._get_cuda_arch_flags()


@pytest.mark.parametrize("arch_list", ["8.0;8.6;8.9;9.0+PTX", "7.5 8.0 9.0", "Ampere;Hopper",
                                       "9.0a;10.0;12.0+PTX", "8.0+PTX;8.0", "Blackwell"])
def test_flags_are_torchs_for_the_same_list(arch_list, monkeypatch):
    ours = cuda_arch.gencode_flags(cuda_arch.parse_arch_list(arch_list))
    assert sorted(ours) == torch_flags(arch_list, monkeypatch)


def test_targets_of_a_list():
    assert cuda_arch.parse_arch_list("8.0;8.6;8.9;9.0+PTX") == (
        "sm_80", "sm_86", "sm_89", "sm_90", "compute_90")
    assert cuda_arch.parse_arch_list("12.0+PTX; 9.0a  10.0") == (
        "sm_90a", "sm_100", "sm_120", "compute_120")
    assert cuda_arch.parse_arch_list("native", visible=[(8, 6), (9, 0), (8, 6)]) == (
        "sm_86", "sm_90", "compute_90")


@pytest.mark.parametrize("bad", ["sm_90", "9", "9.0+ptx", "90", "Hoper", " ; "])
def test_a_bad_entry_is_named(bad):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_arch.parse_arch_list(bad)


def test_native_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="native but no CUDA device"):
        cuda_arch.parse_arch_list("native", visible=[])


def test_where_the_list_comes_from():
    default, src = cuda_arch.build_targets({})
    assert src == "the default list"
    # every common data-centre and workstation GPU has machine code, newer ones get PTX
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"} <= set(default)
    assert [t for t in default if t.startswith("compute_")] == ["compute_120"]
    assert cuda_arch.build_targets({"OFMU_CUDA_ARCHS": "80;90"}) == (
        ("sm_80", "sm_90", "compute_90"), "OFMU_CUDA_ARCHS (deprecated: use TORCH_CUDA_ARCH_LIST)")
    both = {"OFMU_CUDA_ARCHS": "80", "TORCH_CUDA_ARCH_LIST": "8.9"}
    assert cuda_arch.build_targets(both) == (("sm_89",), "TORCH_CUDA_ARCH_LIST")
    with pytest.raises(ValueError, match="OFMU_CUDA_ARCHS='sm90'"):
        cuda_arch.build_targets({"OFMU_CUDA_ARCHS": "sm90"})


def test_the_default_list_compiles_with_cuda_13():
    cuda_arch.check_supported(cuda_arch.build_targets({})[0], NVCC13)
    with pytest.raises(ValueError, match=r"cannot compile for sm_70, compute_70 .*starts at sm_75"):
        cuda_arch.check_supported(cuda_arch.parse_arch_list("7.0+PTX;8.0"), NVCC13)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_the_default_list_is_known_to_the_nvcc_here():
    listed = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=True)
    cuda_arch.check_supported(cuda_arch.build_targets({})[0], listed.stdout.split())


@pytest.mark.parametrize("cap,covered", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # sm_80 SASS runs on 8.x with x >= 0
    ((9, 0), True), ((10, 0), True), ((12, 0), True),  # compute_90 PTX: every newer GPU
    ((7, 5), False),  # older than everything built
])
def test_coverage_of_a_build(cap, covered):
    why = cuda_arch.coverage(("sm_80", "sm_90", "compute_90"), cap)
    assert (why == "") == covered
    if not covered:
        assert "compute capability 7.5" in why and "TORCH_CUDA_ARCH_LIST='7.5'" in why


def test_sass_runs_only_within_its_major_and_arch_specific_code_only_on_its_arch():
    assert cuda_arch.coverage(("sm_90",), (10, 0))  # no PTX: Blackwell cannot run Hopper SASS
    assert cuda_arch.coverage(("sm_86",), (8, 0))  # 8.6 code needs 8.6 or newer within 8.x
    assert cuda_arch.coverage(("sm_90a", "compute_90a"), (10, 0))
    assert cuda_arch.coverage(("sm_90a",), (9, 0)) == ""
    assert cuda_arch.coverage((), (9, 0))


def test_the_module_loads_by_path_without_ofmu(tmp_path):
    """setup.py loads cuda_arch.py by path before ofmu is installed: the standard library must be
    enough (a run with no torch and no ofmu on the path)."""
    path = str(ROOT / "python" / "ofmu" / "cuda_arch.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {path!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert 'torch' not in sys.modules and 'ofmu' not in sys.modules\n"
            "print(m.build_targets({'TORCH_CUDA_ARCH_LIST': '8.0;9.0+PTX'})[0])\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('sm_80', 'sm_90', 'compute_90')"


# ------------------------------------------------------------------ setup.py with a stand-in CUDA


def fake_toolkit(tmp_path: Path) -> Path:
    """A CUDA_HOME whose nvcc only lists CUDA 13's architectures."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(NVCC13) + "\n")
    nvcc.chmod(0o755)
    return home


def run_setup(tmp_path, monkeypatch, env: dict[str, str]) -> setuptools.Extension:
    """setup.py executed as pip would, with setup() captured and torch made to look like a CUDA
    build with the fake toolkit."""
    home = fake_toolkit(tmp_path)
    for k in ("TORCH_CUDA_ARCH_LIST", "OFMU_CUDA_ARCHS", "OFMU_SKIP_CPP_BUILD",
              "OFMU_SKIP_CUDA_BUILD"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"OFMU_FORCE_CUDA": "1", "CUDA_HOME": str(home), **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    (ext,) = captured["ext_modules"]
    return ext


def test_setup_passes_torch_cuda_arch_list_to_nvcc(tmp_path, monkeypatch):
    ext = run_setup(tmp_path, monkeypatch, {"TORCH_CUDA_ARCH_LIST": "8.0;8.6;9.0+PTX"})
    nvcc = ext.extra_compile_args["nvcc"]
    assert sorted(f for f in nvcc if f.startswith("-gencode")) == torch_flags("8.0;8.6;9.0+PTX",
                                                                              monkeypatch)
    # recorded in the extension for the run-time check, and torch adds no flags of its own
    assert "-DOFMU_CUDA_TARGETS=sm_80,sm_86,sm_90,compute_90" in ext.extra_compile_args["cxx"]
    assert cpp_extension._get_cuda_arch_flags(nvcc) == []


def test_setup_default_and_refusal(tmp_path, monkeypatch):
    ext = run_setup(tmp_path, monkeypatch, {})
    flags = [f for f in ext.extra_compile_args["nvcc"] if f.startswith("-gencode")]
    assert sorted(flags) == torch_flags(cuda_arch.DEFAULT_ARCH_LIST, monkeypatch)
    with pytest.raises(ValueError, match="cannot compile for sm_70"):
        run_setup(tmp_path / "again", monkeypatch, {"TORCH_CUDA_ARCH_LIST": "7.0;9.0"})


# ------------------------------------------------------------------------ the run-time check


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """A cuda backend that exists, built for ``targets``, on a GPU of capability ``cap``."""
    def install(targets: tuple[str, ...] | None, cap: tuple[int, int]):
        fake = backends.Backend("cuda", None, None, None, None)
        monkeypatch.setattr(backends, "_CACHE", {**backends._CACHE, "cuda": (fake, "")})
        monkeypatch.setattr(backends, "built_cuda_targets", lambda: targets)
        monkeypatch.setattr(backends, "_capability", lambda device: cap)
        monkeypatch.delenv("OFMU_BACKEND", raising=False)
        return fake
    return install


def test_cuda_backend_refused_on_an_uncovered_gpu(fake_cuda_build):
    fake_cuda_build(("sm_90", "compute_90"), (8, 0))
    b, reason = backends.select("auto", torch.device("cuda", 0))
    assert b.name in ("triton", "torch")
    assert "cuda: ofmu._C was built for sm_90, compute_90" in reason
    assert "compute capability 8.0" in reason
    with pytest.raises(RuntimeError, match="backend 'cuda' requested via backend= is unavailable: "
                                           "ofmu._C was built for sm_90"):
        backends.select("cuda", torch.device("cuda", 0))


@pytest.mark.parametrize("targets", [("sm_80", "sm_90", "compute_90"), None])
def test_cuda_backend_chosen_on_a_covered_gpu(fake_cuda_build, targets):
    """None: an extension built before the record existed is not second-guessed."""
    fake = fake_cuda_build(targets, (8, 6))
    assert backends.select("auto", torch.device("cuda", 0)) == (fake, "first available for cuda")


def test_backend_info_names_the_uncovered_gpu(fake_cuda_build, monkeypatch):
    fake_cuda_build(("sm_90",), (8, 9))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = backend_info()
    ok, why = info.available["cuda"]
    assert not ok and "compute capability 8.9" in why
    assert info.chosen["cuda"][0] != "cuda" and "compute capability 8.9" in info.chosen["cuda"][1]


def test_the_built_extension_records_its_targets():
    if importlib.util.find_spec("ofmu._C") is None:
        pytest.skip("ofmu._C not built")
    from ofmu import _C
    recorded = cuda_arch.decode(_C.cuda_archs)
    cuda_built = torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::update", "CUDA")
    assert bool(recorded) == cuda_built
    assert backends.built_cuda_targets() == recorded
