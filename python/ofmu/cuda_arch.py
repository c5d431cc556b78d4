"""Which GPU architectures a CUDA build of ``ofmu._C`` covers, and whether a device is one of them.

Used twice: by ``setup.py``, which loads this file by path before ofmu is installed (so: the
standard library only, no relative imports), to turn ``TORCH_CUDA_ARCH_LIST`` into nvcc flags; and
by :mod:`ofmu.backends` at run time, to refuse the ``cuda`` backend on a GPU the build does not
cover (the first launch would fail with "no kernel image is available").

A build is a tuple of *targets*: ``sm_XY`` (machine code, SASS) and ``compute_XY`` (PTX, compiled
by the driver at first use). SASS for X.Y runs on devices of capability X.Z with Z >= Y; PTX for
X.Y runs on every device of capability >= X.Y. An ``a`` suffix (``sm_90a``) is arch-specific: that
exact capability only. An ``f`` suffix (``sm_100f``) is family-specific: the same major, Z >= Y.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# T4 (7.5), A100/A30 (8.0), RTX 30xx/A10/A40 (8.6), L4/L40/RTX 40xx (8.9), H100/H200 (9.0),
# B200 (10.0), RTX 50xx/RTX PRO (12.0); PTX of 12.0 for GPUs newer than this list. CUDA 13's nvcc
# starts at 7.5 (Turing).
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

# torch's names (torch.utils.cpp_extension._get_cuda_arch_flags); combined names first, so that
# "Ampere+Tegra" is not read as "Ampere" followed by "+Tegra".
NAMED_ARCHES = (
    ("Kepler+Tesla", "3.7"), ("Kepler", "3.5+PTX"), ("Maxwell+Tegra", "5.3"),
    ("Maxwell", "5.0;5.2+PTX"), ("Pascal", "6.0;6.1+PTX"), ("Volta+Tegra", "7.2"),
    ("Volta", "7.0+PTX"), ("Turing", "7.5+PTX"), ("Ampere+Tegra", "8.7"), ("Ampere", "8.0;8.6+PTX"),
    ("Ada", "8.9+PTX"), ("Hopper", "9.0+PTX"), ("Blackwell+Tegra", "11.0"),
    ("Blackwell", "10.0;10.3;12.0;12.1+PTX"),
)

_ENTRY = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")
_TARGET = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


def parse_arch_list(text: str, visible: Iterable[tuple[int, int]] = ()) -> tuple[str, ...]:
    """Targets of a ``TORCH_CUDA_ARCH_LIST`` string, torch's convention: entries ``X.Y`` (SASS),
    ``X.Y+PTX`` (SASS and PTX), ``X.Ya`` (arch-specific), torch's names (``Ampere``, ``Hopper``,
    ...), separated by ``;`` or spaces. ``native``: the ``visible`` devices' capabilities, PTX of
    the newest. Sorted and without repeats, e.g. ``("sm_80", "sm_90", "compute_90")``."""
    text = text.strip()
    if text == "native":
        caps = sorted(set(visible))
        if not caps:
            raise ValueError("TORCH_CUDA_ARCH_LIST=native but no CUDA device is visible; "
                             "name the architectures, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'")
        text = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    for name, value in NAMED_ARCHES:
        text = text.replace(name, value)
    entries = [e for e in re.split(r"[;\s]+", text) if e]
    if not entries:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty; e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'")
    targets = set()
    for e in entries:
        m = _ENTRY.match(e)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {e!r} is not an architecture: expected "
                             "X.Y, X.Y+PTX or X.Ya (e.g. 8.6, 9.0+PTX, 9.0a) or a name (Ampere)")
        num = f"{m[1]}{m[2]}{m[3]}"
        targets.add(f"sm_{num}")
        if m[4]:
            targets.add(f"compute_{num}")
    return tuple(sorted(targets, key=_order))


def _order(target: str) -> tuple[int, int, int, str]:
    kind, major, minor, suffix = split_target(target)
    return (kind == "compute", major, minor, suffix)


def split_target(target: str) -> tuple[str, int, int, str]:
    """``"sm_90a"`` -> ``("sm", 9, 0, "a")``."""
    m = _TARGET.match(target.strip())
    if m is None:
        raise ValueError(f"{target!r} is not a CUDA target (expected sm_XY or compute_XY)")
    return m[1], int(m[2]), int(m[3]), m[4]


def check_supported(targets: Iterable[str], supported: Iterable[str]) -> None:
    """Raise, naming them, if nvcc cannot compile some targets (``supported``: the lines of
    ``nvcc --list-gpu-code``, e.g. ``sm_75``). Suffixed targets are checked by their base."""
    have = {s.strip() for s in supported if _TARGET.match(s.strip())}
    bad = [t for t in targets if f"sm_{''.join(map(str, split_target(t)[1:3]))}" not in have]
    if bad:
        lowest = min(have, key=lambda s: split_target(s)[1:3]) if have else "?"
        raise ValueError(f"this nvcc cannot compile for {', '.join(bad)} (it knows "
                         f"{', '.join(sorted(have, key=_order))}; CUDA 13 starts at {lowest}); "
                         "remove them from TORCH_CUDA_ARCH_LIST")


def gencode_flags(targets: Iterable[str]) -> list[str]:
    """nvcc flags, in torch's form: ``-gencode=arch=compute_XY,code=sm_XY`` per SASS target and
    ``-gencode=arch=compute_XY,code=compute_XY`` per PTX target."""
    flags = []
    for t in targets:
        kind, major, minor, suffix = split_target(t)
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code={kind}_{num}")
    return flags


def build_targets(env: Mapping[str, str], visible: Iterable[tuple[int, int]] = ()
                  ) -> tuple[tuple[str, ...], str]:
    """The targets to build for and where they came from: ``TORCH_CUDA_ARCH_LIST``, else the
    deprecated ``OFMU_CUDA_ARCHS`` (SM numbers such as ``"80;90"``, PTX of the newest), else
    :data:`DEFAULT_ARCH_LIST`."""
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return parse_arch_list(env["TORCH_CUDA_ARCH_LIST"], visible), "TORCH_CUDA_ARCH_LIST"
    old = env.get("OFMU_CUDA_ARCHS", "").strip()
    if old:
        sms = [s.strip().replace(".", "") for s in re.split(r"[;,\s]+", old) if s.strip()]
        if not all(s.isdigit() and len(s) >= 2 for s in sms):
            raise ValueError(f"OFMU_CUDA_ARCHS={old!r}: expected SM numbers such as '80;90'")
        newest = max(sms, key=int)
        text = ";".join(f"{s[:-1]}.{s[-1]}" + ("+PTX" if s == newest else "") for s in sms)
        return parse_arch_list(text), "OFMU_CUDA_ARCHS (deprecated: use TORCH_CUDA_ARCH_LIST)"
    return parse_arch_list(DEFAULT_ARCH_LIST), "the default list"


def encode(targets: Iterable[str]) -> str:
    """The targets as one preprocessor token list (``sm_80,compute_90``), recorded in the
    extension as ``ofmu._C.cuda_archs``."""
    return ",".join(targets)


def decode(recorded: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in recorded.split(",") if t.strip())


def runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``target`` runs on a device of compute ``capability``."""
    kind, major, minor, suffix = split_target(target)
    if suffix == "a":
        return capability == (major, minor)
    if kind == "sm" or suffix == "f":
        return capability[0] == major and capability[1] >= minor
    return tuple(capability) >= (major, minor)


def coverage(targets: Iterable[str], capability: tuple[int, int]) -> str:
    """``""`` if the build runs on a device of ``capability``, else a sentence saying why not
    and how to rebuild."""
    targets = tuple(targets)
    if any(runs_on(t, capability) for t in targets):
        return ""
    cap = f"{capability[0]}.{capability[1]}"
    return (f"ofmu._C was built for {', '.join(targets) or 'no GPU architecture'}, none of which "
            f"runs on this GPU (compute capability {cap}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST='{cap}' (docs/kernels.md, 'Architectures')")
