"""Shared runner for the benchmark scripts: timing, statistics, metadata, CSV and tables.

One job: make every benchmark measure and record the same way.

* CPU samples are ``time.perf_counter`` around a batch of calls; CUDA samples are CUDA events
  around the same batch. Small calls are batched so that one sample lasts at least
  ``min_sample_s`` (timer resolution and Python overhead stay below ~1%); the per-call time is
  the sample divided by the batch size. Warm-up calls are never recorded.
* Results are summarised as median and inter-quartile range over samples (robust to the
  stalls a shared machine produces: quote medians).
* Every CSV row carries the device name and the library versions it was measured with.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ..files import write_text_atomic

# Default output folder: under the current directory (the repository keeps its measured results
# in benchmarks/results/, written there with --out).
RESULTS_DIR = Path("ofmu-bench-results")


# ------------------------------------------------------------------------------ options

# Buffer dtypes by every name a user may type: the short names of the tables, torch's names.
DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def parse_dtypes(text: str) -> list[torch.dtype]:
    """``"fp32,bfloat16"`` -> dtypes; ``torch.`` prefixes are accepted, an unknown name is a clear
    error (SystemExit) listing the accepted ones."""
    out = []
    for name in (t.strip().lower().removeprefix("torch.") for t in text.split(",")):
        if not name:
            continue
        if name not in DTYPE_NAMES:
            raise SystemExit(f"unknown dtype {name!r} in --dtypes; use any of "
                             f"{', '.join(DTYPE_NAMES)} (comma separated)")
        if DTYPE_NAMES[name] not in out:
            out.append(DTYPE_NAMES[name])
    if not out:
        raise SystemExit("--dtypes is empty; use e.g. --dtypes fp32,bf16")
    return out


# ------------------------------------------------------------------------------ device facts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_bytes(device: torch.device) -> int | None:
    """Size of the last-level cache that a second read can hit: L2 on a GPU, the CPU's LLC."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if m:
            b = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
            best = b if best is None else max(best, b)
    return best


def versions() -> dict[str, str]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        import ofmu

        ov = ofmu.__version__
    except ImportError:
        ov = "none"
    return {"torch": torch.__version__, "triton": tv, "ofmu": ov}


def cpu_isa(device: torch.device, dtype: torch.dtype) -> str:
    """The instruction set of the C++ CPU kernels that ``dtype`` buffers run on ("avx512",
    "avx2", "portable"; docs/kernels.md), "" off the CPU, "none" without ``ofmu._C``."""
    if device.type != "cpu":
        return ""
    from ..backends import cpu_isa as isa

    return isa(dtype) or "none"


def metadata(device: torch.device) -> dict[str, object]:
    """The columns that key every row: device, versions and the thread count in use."""
    return {"device": device_name(device), **versions(), "threads": torch.get_num_threads()}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "device"


def set_threads(n: int) -> None:
    """Intra-op threads for torch and (through torch's libgomp) the ofmu._C OpenMP kernels."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # for anything that reads it later


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is visible")
    return dev


# ------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# CPU clocks: "wall" (perf_counter) or "thread" (the calling thread's CPU time: on a shared
# machine it leaves out the time the process waits for a core; valid for single-threaded ops,
# which run on the calling thread).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _sample(fn: Callable[[], object], calls: int, device: torch.device,
            clock: str = "wall") -> float:
    """Seconds for ``calls`` back-to-back calls (CUDA events on a GPU, ``CLOCKS[clock]`` on a
    CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(calls):
        fn()
    return now() - t0


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2,
            min_sample_s: float = 2e-3, max_calls: int = 10_000) -> tuple[list[float], int]:
    """Per-call seconds of ``repeats`` samples (warm-up excluded) and the calls per sample."""
    return time_interleaved({"fn": fn}, device, repeats, warmup, min_sample_s, max_calls)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                     repeats: int = 10, warmup: int = 2, min_sample_s: float = 2e-3,
                     max_calls: int = 10_000, clock: str = "wall"
                     ) -> dict[str, tuple[list[float], int]]:
    """Like :func:`time_fn` for several functions, sampled round-robin (sample r of every
    function before sample r+1 of any), so that a slow drift of the machine — other load,
    clock changes — biases none of them against the others."""
    synchronize(device)
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        one = max(_sample(fn, 1, device, clock), 1e-9)
        calls[name] = max(1, min(max_calls, math.ceil(min_sample_s / one)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, calls[name], device, clock) / calls[name])
    return {name: (samples[name], calls[name]) for name in fns}


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (inclusive method, so one sample gives a zero IQR)."""
    s = sorted(samples)
    if len(s) == 1:
        q25 = med = q75 = s[0]
    else:
        q25, med, q75 = statistics.quantiles(s, n=4, method="inclusive")
    return {"median_s": med, "q25_s": q25, "q75_s": q75, "iqr_s": q75 - q25}


class Stopwatch:
    """Accumulates wall time of labelled regions (CPU) or CUDA-event pairs (GPU, resolved later
    so that timing does not add host synchronisations inside the measured step)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device = device
        self.now = CLOCKS[clock]  # CPU: "thread" leaves out waiting for a core (1 thread only)
        self.cpu: dict[str, float] = {}
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    def wrap(self, label: str | Callable[[], str], fn: Callable) -> Callable:
        """``fn`` with its time added to ``label`` (a string, or a callable read at call time:
        lets one wrapper attribute time to the phase the caller is in)."""
        def timed(*args, **kwargs):
            key = label() if callable(label) else label
            if self.device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = fn(*args, **kwargs)
                e.record()
                self.events.setdefault(key, []).append((s, e))
                return out
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[key] = self.cpu.get(key, 0.0) + self.now() - t0

        return timed

    def totals(self) -> dict[str, float]:
        out = dict(self.cpu)
        if self.events:
            synchronize(self.device)
            for label, pairs in self.events.items():
                out[label] = out.get(label, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        return out

    def reset(self) -> None:
        self.cpu.clear()
        self.events.clear()


# ------------------------------------------------------------------------------ CSV and tables


def output_stem(kind: str, args) -> str:
    """``<out>/<kind>-<device>[-tag]``: where a benchmark writes its CSV (and plot)."""
    name = f"{kind}-{slug(device_name(resolve_device(args.device)))}"
    return os.path.join(args.out, name + (f"-{args.tag}" if args.tag else ""))


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """Written atomically (:func:`ofmu.files.replace_atomic`): an interrupted run leaves the
    previous results intact."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k, "")) for k in columns})
    return write_text_atomic(buf.getvalue(), path)


def _fmt_csv(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n} B"
