"""What the default step path must not do: read environment variables, or read a device value
on the host (the CPU stand-in for the GPU tests' sync check: every host read of a tensor value
goes through ``aten._local_scalar_dense``, which a dispatch mode sees on any device)."""

import os

import pytest
import torch
from ofmu import OFMU
from torch.utils._python_dispatch import TorchDispatchMode

ce = torch.nn.functional.cross_entropy
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}


def _setup(backend, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    xf, yf = torch.randn(5, 6), torch.randint(0, 3, (5,))
    xr, yr = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def closure(same_batch=False):
        return ce(model(xf), yf), ce(model(xr), yr)

    opt = OFMU(model.parameters(), lr=0.01, inner_steps=2, backend=backend, **kw)
    opt.step(closure)  # warm-up: lazy set-up may do anything once
    return opt, closure


class _Recorder(dict):
    """``os.environ`` stand-in that records every key looked up."""

    def __init__(self, env):
        super().__init__(env)
        self.read: list[str] = []

    def __getitem__(self, k):
        self.read.append(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.append(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.append(k)
        return super().__contains__(k)


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


BACKENDS = ["torch", "cpp"]
MODES = [dict(), dict(similarity="hvp"), dict(outer_hvp="fd"), dict(max_grad_norm=0.1,
                                                                   weight_decay=0.01,
                                                                   forget_loss_cap=5.0),
         dict(preconditioner="adam"), dict(rho=0.0)]


def _available(name):
    from ofmu.backends import probe
    if probe(name)[0] is None:
        pytest.skip(f"backend {name} unavailable: {probe(name)[1]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_reads_no_environment_variable(backend, monkeypatch):
    _available(backend)
    opt, closure = _setup(backend)
    rec = _Recorder(os.environ)
    monkeypatch.setattr(os, "environ", rec)
    opt.step(closure)
    assert rec.read == []


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: ",".join(kw) or "default")
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_reads_no_device_value_on_the_host(backend, kw):
    _available(backend)
    opt, closure = _setup(backend, **kw)
    with _HostReads() as mode:
        opt.step(closure)
    assert mode.seen == []
