"""The one place that chooses which kernels run the step math.

Order of preference (the order of :func:`register`): on CUDA tensors the CUDA extension, then
Triton, then the torch reference; on CPU tensors the C++ extension, then the torch reference.
A new backend is a module with its kernels and one :func:`register` line below. ``backend=`` on the
optimizer or the ``OFMU_BACKEND`` environment variable overrides the choice (an unavailable
explicit choice is an error, never a silent fallback). :func:`backend_info` says what exists
here and why the rest does not.

Every backend implements the kernel contract (docs/design.md, "Kernel contract"; the torch
reference is :mod:`ofmu.reference`):
``reduce3(x, y)``, ``combine(x, y, coeffs, out_a, out_b=None)``, ``update(theta, x, y, coeffs)``
and ``finalize(gstats, ustats, checks, ok, project, gamma, eps, lr, weight_decay, max_norm, cap)``
(the summed statistics into the packed coefficients of a step, docs/kernels.md); the record
also carries the Adam and sign updates (:mod:`ofmu.preconditioned` unless a backend has its own).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import cuda_arch, preconditioned, reference


@dataclass(frozen=True)
class Backend:
    """What a backend can do: the four ops of the kernel contract, and the preconditioned
    updates (``adam``, ``sign``; torch's by default, :mod:`ofmu.preconditioned`)."""

    name: str
    reduce3: Callable
    combine: Callable
    update: Callable
    finalize: Callable
    adam: Callable = preconditioned.adam_apply
    sign: Callable = preconditioned.sign_apply


OPS = ("reduce3", "combine", "update", "finalize", "adam", "sign")


@dataclass(frozen=True)
class Registration:
    """How a backend is found: ``probe()`` gives ``(Backend or None, why not)``; ``runs_on``
    lists the device classes (``"cpu"``, ``"cuda"``) it may be asked for, ``auto_on`` those
    where ``backend="auto"`` tries it (in registration order); ``covers(device)`` says why the
    backend cannot run on that device ("" when it can)."""

    probe: Callable[[], tuple[Backend | None, str]]
    runs_on: tuple[str, ...]
    auto_on: tuple[str, ...]
    covers: Callable[[torch.device], str] | None = None


REGISTRY: dict[str, Registration] = {}


def register(name: str, probe: Callable[[], tuple[Backend | None, str]], runs_on: tuple[str, ...],
             auto_on: tuple[str, ...] | None = None,
             covers: Callable[[torch.device], str] | None = None) -> None:
    """Add a backend: the one line a new backend module needs here. ``auto`` prefers the
    backends registered first; the torch reference, registered last, is always available."""
    REGISTRY[name] = Registration(probe, runs_on, runs_on if auto_on is None else auto_on, covers)


def _torch_backend() -> Backend:
    return Backend("torch", reference.reduce3, reference.combine, reference.update,
                   reference.finalize)


_EXT_OPS = ("reduce3", "combine", "update", "finalize")  # what ofmu._C registers


def _load_ext() -> tuple[object | None, str]:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ofmu.*)
    except ImportError as e:  # not built, or built against another torch
        return None, f"ofmu._C not importable ({e})"
    return torch.ops.ofmu, ""


def cpu_isa(dtype: torch.dtype = torch.float32) -> str | None:
    """The instruction set of the C++ CPU kernels for ``dtype`` buffers: "avx512", "avx2" or
    "portable" (docs/kernels.md, "CPU fast paths"); None without ``ofmu._C``."""
    ops, _ = _load_ext()
    if ops is None or not hasattr(ops, "_cpu_isa"):
        return None
    return ops._cpu_isa(dtype=dtype)


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ofmu::{op}", key)
    except RuntimeError:  # no such op: an extension built from older sources
        return False


def _ext_backend(name: str, key: str) -> tuple[Backend | None, str]:
    ops, why = _load_ext()
    if ops is None:
        return None, why
    if not all(_has_kernel(op, "Meta") for op in _EXT_OPS):  # built from older sources
        return None, ("ofmu._C lacks ops of this version (" + ", ".join(
            op for op in _EXT_OPS if not _has_kernel(op, "Meta")) + "): rebuild the extension")
    if not all(_has_kernel(op, key) for op in _EXT_OPS):
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


def _cuda_covers(device: torch.device) -> str:
    """Built for other GPUs only, the first launch would fail with "no kernel image"."""
    targets = built_cuda_targets()
    return "" if targets is None else cuda_arch.coverage(targets, _capability(device))


register("cpp", lambda: _ext_backend("cpp", "CPU"), runs_on=("cpu",))
register("cuda", lambda: _ext_backend("cuda", "CUDA"), runs_on=("cuda",), covers=_cuda_covers)
register("triton", _triton_backend, runs_on=("cuda", "cpu"), auto_on=("cuda",))  # CPU: interpreter
register("torch", lambda: (_torch_backend(), ""), runs_on=("cpu", "cuda"))
NAMES = tuple(REGISTRY)


def _probe(name: str) -> tuple[Backend | None, str]:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")
    return REGISTRY[name].probe()


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
    """:func:`probe`, and whether the backend covers ``device`` (its registration's ``covers``:
    the CUDA build's GPU architectures)."""
    b, why = probe(name)
    covers = REGISTRY[name].covers
    if b is None or covers is None:
        return b, why
    why = covers(device)
    return (None, why) if why else (b, "")


def device_class(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def select(requested: str | Backend, device: torch.device) -> tuple[Backend, str]:
    """The backend for buffers on ``device`` and a sentence saying why it was chosen. A
    :class:`Backend` object is taken as given (an instrumented one, say: the step benchmark
    times the kernels through one)."""
    if isinstance(requested, Backend):
        return requested, f"{requested.name} given as a Backend object"
    env = os.environ.get("OFMU_BACKEND")
    if requested == "auto" and env:
        requested, source = env, "OFMU_BACKEND"
    else:
        source = "backend="
    cls = device_class(device)
    if requested != "auto":
        if requested not in NAMES:
            raise ValueError(f"unknown backend {requested!r} (from {source}); "
                             f"expected 'auto' or one of {NAMES}")
        if cls not in REGISTRY[requested].runs_on:
            raise ValueError(f"backend {requested!r} (from {source}) cannot run on {device}")
        b, why = probe_on(requested, device)
        if b is None:
            raise RuntimeError(f"backend {requested!r} requested via {source} is unavailable: "
                               f"{why}")
        return b, f"{requested} requested via {source}"
    skipped = []
    for name in (n for n, r in REGISTRY.items() if cls in r.auto_on):
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
                           env_override=os.environ.get("OFMU_BACKEND"),
                           cpu_isa={str(d).replace("torch.", ""): cpu_isa(d) for d in
                                    (torch.float32, torch.bfloat16, torch.float16, torch.float64)})
