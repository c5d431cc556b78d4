"""Build script for ofmu.

The Python packages are ``ofmu`` (from ``python/ofmu``) and ``ofmu_kernels`` (Triton kernels).
The compiled extension ``ofmu._C`` (sources in ``csrc/``) always gets the CPU kernels; the CUDA
kernels are added when torch is a CUDA build and ``nvcc`` is found (docs/kernels.md).

Install with ``pip install -e . --no-build-isolation`` so the build uses the installed torch.

Build knobs (environment variables, in the style of flash-attention's setup.py):

* ``OFMU_SKIP_CPP_BUILD=TRUE``  build no extension at all (pure-Python install; the torch and
  Triton backends still work).
* ``OFMU_SKIP_CUDA_BUILD=TRUE`` build the CPU kernels only, even where CUDA could be built.
* ``OFMU_FORCE_CUDA=TRUE``      fail the build if the CUDA kernels cannot be built, instead of
  silently building CPU-only (use it on GPU machines and in GPU CI).
* ``TORCH_CUDA_ARCH_LIST``      the GPU architectures to compile for, torch's convention
  ("8.0;8.6;9.0+PTX", names such as "Ampere", or "native" for the visible GPUs). Default:
  ofmu.cuda_arch.DEFAULT_ARCH_LIST (7.5 to 12.0, PTX of 12.0). ``OFMU_CUDA_ARCHS="80;90"`` is a
  deprecated alias (SM numbers, PTX of the newest), read only when TORCH_CUDA_ARCH_LIST is unset.
* ``NVCC_THREADS``              nvcc threads compiling the architectures in parallel (default 4).
* ``MAX_JOBS``                  parallel compile jobs for ninja (read by torch's BuildExtension).
* ``CUDA_HOME``                 the CUDA toolkit; when unset, the toolkit of the ``nvcc`` on PATH
  (or /usr/local/cuda) that actually has ``include/cuda_runtime.h`` (see _default_cuda_home).
"""

import importlib.util
import os
import shutil
import subprocess

from setuptools import find_packages, setup

packages = ["ofmu" + p[len("ofmu") :] for p in find_packages("python", include=["ofmu", "ofmu.*"])]

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


# Every build knob, read once.
SKIP_CPP_BUILD = _flag("OFMU_SKIP_CPP_BUILD")
SKIP_CUDA_BUILD = _flag("OFMU_SKIP_CUDA_BUILD")
FORCE_CUDA = _flag("OFMU_FORCE_CUDA")
NVCC_THREADS = os.environ.get("NVCC_THREADS", "4")


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to setup.py.
    return os.path.join(*parts)


def _default_cuda_home() -> None:
    """Set CUDA_HOME when torch would guess wrong.

    torch takes ``dirname(dirname(which nvcc))`` as the toolkit, which is wrong when ``nvcc`` on
    PATH is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc:
    torch then looks for cuda_runtime.h in /usr/local/include). Must run before
    torch.utils.cpp_extension is imported, which reads the variable once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_build_possible() -> tuple[bool, str]:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, f"nvcc not found (CUDA_HOME={home}; set CUDA_HOME to the CUDA toolkit)"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return False, f"{home}/include/cuda_runtime.h not found (set CUDA_HOME to the CUDA toolkit)"
    return True, ""


def _cuda_arch_module():
    """python/ofmu/cuda_arch.py, loaded by path: ofmu is not installed yet while this runs."""
    spec = importlib.util.spec_from_file_location(
        "_ofmu_cuda_arch", os.path.join(HERE, "python", "ofmu", "cuda_arch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_targets(arch, home: str) -> tuple[tuple[str, ...], str]:
    """The architectures to build for (TORCH_CUDA_ARCH_LIST, see the top), checked against what
    this nvcc can compile before any work starts."""
    import torch

    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    targets, source = arch.build_targets(os.environ, visible)
    listed = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-code"],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        arch.check_supported(targets, listed.stdout.split())
    return targets, source


def _extensions() -> tuple[list, dict]:
    if SKIP_CPP_BUILD:
        print("ofmu: OFMU_SKIP_CPP_BUILD set, not building ofmu._C")
        return [], {}
    _default_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = [_rel("csrc", "ofmu.cpp"), _rel("csrc", "cpu", "ofmu_cpu.cpp")]
    # No contraction of a*b + c into an FMA: the AVX-512 kernels (whose target enables FMA
    # instructions) must round like the portable loops (csrc/cpu/avx512_kernels.h).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]

    if SKIP_CUDA_BUILD:
        build_cuda, why = False, "OFMU_SKIP_CUDA_BUILD set"
    else:
        build_cuda, why = _cuda_build_possible()
    if FORCE_CUDA and not build_cuda:
        raise RuntimeError(f"OFMU_FORCE_CUDA is set but the CUDA kernels cannot be built: {why}")

    if build_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        arch = _cuda_arch_module()
        targets, source = _cuda_targets(arch, CUDA_HOME)
        cuda_sources = [_rel("csrc", "cuda", "ofmu_cuda.cpp"),
                        _rel("csrc", "cuda", "ofmu_kernels.cu")]
        ext = CUDAExtension(
            name="ofmu._C",
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                # The built targets, recorded as ofmu._C.cuda_archs (checked at run time).
                "cxx": cxx_flags + [f"-DOFMU_CUDA_TARGETS={arch.encode(targets)}"],
                # The .cu files include no torch headers: C++17 is enough and compiles fastest.
                "nvcc": ["-O3", "-std=c++17", f"--threads={NVCC_THREADS}"]
                + arch.gencode_flags(targets),
            },
            extra_link_args=link_flags,
        )
        print(f"ofmu: building ofmu._C with CPU and CUDA kernels for {', '.join(targets)} "
              f"(from {source})")
    else:
        ext = CppExtension(
            name="ofmu._C",
            sources=cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        print(f"ofmu: building ofmu._C with CPU kernels only ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=packages + ["ofmu_kernels"],
    package_dir={"ofmu": "python/ofmu", "ofmu_kernels": "ofmu_kernels"},
    package_data={"ofmu": ["py.typed"]},  # PEP 561: the public API is typed
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
