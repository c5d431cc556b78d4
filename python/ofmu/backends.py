"""The one place that chooses which kernels run the step math.

Order of preference: on CUDA tensors the CUDA extension, then Triton, then the torch
reference; on CPU tensors the C++ extension, then the torch reference. ``backend=`` on the
optimizer or the ``OFMU_BACKEND`` environment variable overrides the choice (an unavailable
explicit choice is an error, never a silent fallback). :func:`backend_info` says what exists
here and why the rest does not.

Every backend implements the kernel contract (docs/design.md, "Kernel contract"; the torch
reference is :mod:`ofmu.reference`):
``reduce3(x, y)``, ``combine(x, y, coeffs, out_a, out_b=None)``, ``update(theta, x, y, coeffs)``
and ``finalize(gstats, ustats, checks, ok, project, gamma, eps, lr, weight_decay, max_norm, cap)``
(the summed statistics into the packed coefficients of a step, docs/kernels.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import cuda_arch, reference

NAMES = ("torch", "cpp", "cuda", "triton")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class Backend:
    name: str
    reduce3: Callable
    combine: Callable
    update: Callable
    finalize: Callable


OPS = ("reduce3", "combine", "update", "finalize")


def _torch_backend() -> Backend:
    return Backend("torch", reference.reduce3, reference.combine, reference.update,
                   reference.finalize)


def _load_ext() -> tuple[object | None, str]:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ofmu.*)
    except ImportError as e:  # not built, or built against another torch
        return None, f"ofmu._C not importable ({e})"
    return torch.ops.ofmu, ""


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ofmu::{op}", key)
    except RuntimeError:  # no such op: an extension built from older sources
        return False


def _ext_backend(name: str, key: str) -> tuple[Backend | None, str]:
    ops, why = _load_ext()
    if ops is None:
        return None, why
    if not all(_has_kernel(op, "Meta") for op in OPS):  # built from older sources
        return None, ("ofmu._C lacks ops of this version (" + ", ".join(
            op for op in OPS if not _has_kernel(op, "Meta")) + "): rebuild the extension")
    if not all(_has_kernel(op, key) for op in OPS):
        if key == "CUDA":
            if torch.version.cuda is None:
                return None, "cuda extension not built: torch is a CPU build"
            return None, ("cuda extension not built: nvcc was not found at build time or "
                          "OFMU_SKIP_CUDA_BUILD was set (rebuild with OFMU_FORCE_CUDA=1)")
        return None, f"ofmu._C has no {key} kernels"
    if key == "CUDA" and not torch.cuda.is_available():
        return None, "cuda kernels built but no CUDA device is visible"
    def combine(x, y, coeffs, out_a, out_b=None):
        ops.combine(x, y, coeffs, out_a, out_b)

    return Backend(name, ops.reduce3, combine, ops.update, ops.finalize), ""


def _triton_backend() -> tuple[Backend | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        return None, "triton needs a GPU (or TRITON_INTERPRET=1 for CPU tensors)"
    try:
        import ofmu_kernels as K
    except ImportError as e:
        return None, f"ofmu_kernels not importable ({e})"
    return Backend("triton", K.reduce3, K.combine, K.update, K.finalize), ""


def _probe(name: str) -> tuple[Backend | None, str]:
    if name == "torch":
        return _torch_backend(), ""
    if name == "cpp":
        return _ext_backend("cpp", "CPU")
    if name == "cuda":
        return _ext_backend("cuda", "CUDA")
    if name == "triton":
        return _triton_backend()
    raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")


_CACHE: dict[str, tuple[Backend | None, str]] = {}


def probe(name: str) -> tuple[Backend | None, str]:
    """``(backend or None, reason it is unavailable)``; cached per process."""
    if name not in _CACHE:
        _CACHE[name] = _probe(name)
    return _CACHE[name]


def built_cuda_targets() -> tuple[str, ...] | None:
    """The GPU targets ``ofmu._C`` was compiled for (``ofmu._C.cuda_archs``); None when the
    extension predates that record."""
    from . import _C

    recorded = getattr(_C, "cuda_archs", None)
    return None if recorded is None else cuda_arch.decode(recorded)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def probe_on(name: str, device: torch.device) -> tuple[Backend | None, str]:
    """:func:`probe`, and for ``cuda`` also whether the build covers ``device``'s architecture
    (built for other GPUs only, the first launch would fail with "no kernel image")."""
    b, why = probe(name)
    if b is None or name != "cuda":
        return b, why
    targets = built_cuda_targets()
    why = "" if targets is None else cuda_arch.coverage(targets, _capability(device))
    return (None, why) if why else (b, "")


def _device_class(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def select(requested: str, device: torch.device) -> tuple[Backend, str]:
    """The backend for buffers on ``device`` and a sentence saying why it was chosen."""
    env = os.environ.get("OFMU_BACKEND")
    if requested == "auto" and env:
        requested, source = env, "OFMU_BACKEND"
    else:
        source = "backend="
    cls = _device_class(device)
    if requested != "auto":
        if requested not in NAMES:
            raise ValueError(f"unknown backend {requested!r} (from {source}); "
                             f"expected 'auto' or one of {NAMES}")
        if requested == "cpp" and cls != "cpu" or requested in ("cuda",) and cls != "cuda":
            raise ValueError(f"backend {requested!r} (from {source}) cannot run on {device}")
        b, why = probe_on(requested, device)
        if b is None:
            raise RuntimeError(f"backend {requested!r} requested via {source} is unavailable: "
                               f"{why}")
        return b, f"{requested} requested via {source}"
    skipped = []
    for name in _PREFERENCE[cls]:
        b, why = probe_on(name, device)
        if b is not None:
            reason = f"first available for {cls}"
            if skipped:
                reason += " (" + "; ".join(skipped) + ")"
            return b, reason
        skipped.append(f"{name}: {why}")
    raise AssertionError("the torch reference backend is always available")


def backend_info() -> SimpleNamespace:
    """What exists here and which backend each device class gets (``ofmu info`` prints it)."""
    gpu = torch.cuda.is_available()
    avail = {}
    for n in NAMES:  # cuda: on the current GPU, whose architecture the build may not cover
        b, why = probe_on(n, torch.device("cuda")) if n == "cuda" and gpu else probe(n)
        avail[n] = (b is not None, why)
    chosen = {}
    for cls, dev in (("cpu", torch.device("cpu")), ("cuda", torch.device("cuda"))):
        if cls == "cuda" and not torch.cuda.is_available():
            chosen[cls] = ("-", "no CUDA device visible")
            continue
        b, reason = select("auto", dev)
        chosen[cls] = (b.name, reason)
    return SimpleNamespace(available=avail, chosen=chosen, torch=torch.__version__,
                           env_override=os.environ.get("OFMU_BACKEND"))
