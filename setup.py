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
* ``OFMU_CUDA_ARCHS="90"``      semicolon/comma-separated SM architectures to compile for
  (e.g. "80;90"); each gets SASS plus PTX of the newest one. Default: "90" (H100/H200).
* ``MAX_JOBS``                  parallel compile jobs for ninja (read by torch's BuildExtension).
* ``CUDA_HOME``                 the CUDA toolkit; when unset, the toolkit of the ``nvcc`` on PATH
  (or /usr/local/cuda) that actually has ``include/cuda_runtime.h`` (see _default_cuda_home).
"""

import os
import shutil

from setuptools import find_packages, setup

packages = ["ofmu" + p[len("ofmu") :] for p in find_packages("python", include=["ofmu", "ofmu.*"])]

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


# Every build knob, read once.
SKIP_CPP_BUILD = _flag("OFMU_SKIP_CPP_BUILD")
SKIP_CUDA_BUILD = _flag("OFMU_SKIP_CUDA_BUILD")
FORCE_CUDA = _flag("OFMU_FORCE_CUDA")
CUDA_ARCHS = os.environ.get("OFMU_CUDA_ARCHS", "90")


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


def _gencode_flags(archs: str) -> list[str]:
    sms = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not sms:
        raise RuntimeError("OFMU_CUDA_ARCHS is empty")
    flags = []
    for sm in sms:
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    # PTX of the newest arch so a newer GPU can still JIT the kernels.
    newest = max(sms, key=lambda s: int("".join(ch for ch in s if ch.isdigit())))
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def _extensions() -> tuple[list, dict]:
    if SKIP_CPP_BUILD:
        print("ofmu: OFMU_SKIP_CPP_BUILD set, not building ofmu._C")
        return [], {}
    _default_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = [_rel("csrc", "ofmu.cpp"), _rel("csrc", "cpu", "ofmu_cpu.cpp")]
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]

    if SKIP_CUDA_BUILD:
        build_cuda, why = False, "OFMU_SKIP_CUDA_BUILD set"
    else:
        build_cuda, why = _cuda_build_possible()
    if FORCE_CUDA and not build_cuda:
        raise RuntimeError(f"OFMU_FORCE_CUDA is set but the CUDA kernels cannot be built: {why}")

    if build_cuda:
        cuda_sources = [_rel("csrc", "cuda", "ofmu_cuda.cpp"),
                        _rel("csrc", "cuda", "ofmu_kernels.cu")]
        ext = CUDAExtension(
            name="ofmu._C",
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags,
                # The .cu files include no torch headers: C++17 is enough and compiles fastest.
                "nvcc": ["-O3", "-std=c++17"] + _gencode_flags(CUDA_ARCHS),
            },
            extra_link_args=link_flags,
        )
        print(f"ofmu: building ofmu._C with CPU and CUDA kernels (sm {CUDA_ARCHS})")
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
