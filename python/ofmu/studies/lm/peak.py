"""Peak memory of a block of code (an unlearning run), on CUDA or on CPU."""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on a GPU, else the peak resident set
    size of this process sampled every 10 ms, minus the resident size at entry (on CPU).

    On CPU the C heap's free memory is first handed back to the system (glibc ``malloc_trim``),
    so memory an earlier block freed but the allocator kept resident does not hide this block's
    growth: without it a block that reuses that memory reads as needing none, and the first of
    several equal runs in one process as the only one that does."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(0.01):
                self._max = max(self._max, self._rss())
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the symbols already loaded in this process (no library
    search, which would start a subprocess), or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _trim_heap() -> None:
    """Return the C heap's free pages to the system where the C library can (glibc); elsewhere
    nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
