"""The whole optimizer on a CUDA device (skipped without one; run by benchmarks/gpu_check.sh)."""

import ofmu
import pytest
import torch
from _reference import BatchStream, ReferenceOFMU
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu import backend_info

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [n for n in ("cuda", "triton", "torch")
                if torch.cuda.is_available() and backend_info().available[n][0]]


def mlp(dtype, device="cuda"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 3)).to(device=device, dtype=dtype)


class CudaStream(BatchStream):
    def __call__(self, same_batch=False):
        if not same_batch:
            self.i += 1
        xf, yf, xr, yr = (t.cuda() for t in self.batch(self.i))
        ce = torch.nn.functional.cross_entropy
        return ce(self.model(xf), yf), ce(self.model(xr), yr)


HP = dict(lr=0.1, inner_lr=0.05, beta=0.5, rho=0.2, rho_growth=1.2, rho_max=1.0,
          weight_decay=0.0, max_grad_norm=None)


def run_cuda(backend, dtype, similarity):
    """Parameters after 3 steps on the GPU, plus the float64 reference's start and end."""
    m, mref = mlp(dtype), mlp(torch.float64, device="cpu")
    with torch.no_grad():
        for p, q in zip(mref.parameters(), m.parameters()):
            p.copy_(q.double().cpu())
    start = torch.cat([p.detach().flatten() for p in mref.parameters()])
    kw = dict(similarity=similarity, outer_hvp="forget", inner_steps=2)
    opt = OFMU(m.parameters(), backend=backend, **kw, **HP)
    ref = ReferenceOFMU([dict(params=list(mref.parameters()), **HP)], **kw)
    s, sref = CudaStream(m, dtype=dtype), BatchStream(mref)
    for _ in range(3):
        opt.step(s)
        ref.step(sref)
    got = torch.cat([p.detach().double().cpu().flatten() for p in m.parameters()])
    want = torch.cat([p.detach().flatten() for p in mref.parameters()])
    return got, want, start


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("similarity", ["project", "hvp"])
def test_cuda_step_matches_float64_reference(backend, similarity):
    """fp32: within 1e-4 of the displacement (CPU calibration: 2e-6 correct, 0.16 with beta
    dropped). bf16: the rounding of theta and of the bf16 forward dominates, so the rule is
    flash-attention's: at most 2x the error of the torch backend run in bf16."""
    got, want, start = run_cuda(backend, torch.float32, similarity)
    assert (got - want).norm() <= 1e-4 * (want - start).norm()
    got16, want16, start16 = run_cuda(backend, torch.bfloat16, similarity)
    base16, _, _ = run_cuda("torch", torch.bfloat16, similarity)
    err, base = (got16 - want16).norm(), (base16 - want16).norm()
    assert err <= 2 * base + 1e-2 * (want16 - start16).norm()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("preconditioner", ["sgd", "adam"])
def test_step_has_no_host_sync(backend, preconditioner):
    m = mlp(torch.float32)
    opt = OFMU(m.parameters(), backend=backend, inner_steps=2, rho=0.1,
               preconditioner=preconditioner, **{k: v for k, v in HP.items() if k != "rho"})
    # batches live on the device beforehand: a pageable host-to-device copy would sync
    src = BatchStream(m, dtype=torch.float32)
    batches = iter([tuple(t.cuda() for t in src.batch(i)) for i in range(40)])
    ce = torch.nn.functional.cross_entropy

    def s():
        xf, yf, xr, yr = next(batches)
        return ce(m(xf), yf), ce(m(xr), yr)

    opt.step(s)  # warm-up: lazy allocations and kernel compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step(s)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.last_stats()["skipped_steps"] == 0


# ------------------------------------------------ what users run: the shipped defaults and options

ce = torch.nn.functional.cross_entropy

# The constructor's defaults (Adam per loop, outer_steps=6, outer_hvp="fd", forget_loss_cap=20)
# with rho > 0 so that the finite-difference penalty runs. Parity with the torch backend is
# checked in the SGD form: Adam turns 1-ulp differences between backends into O(lr) ones.
SHIPPED = {
    "defaults": dict(rho=0.1, preconditioner="sgd", lr=0.05),
    "sign-inner": dict(rho=0.1, preconditioner="sgd", lr=0.05, inner_preconditioner="sign"),
    "clip-decay": dict(rho=0.1, preconditioner="sgd", lr=0.05, max_grad_norm=0.05,
                       weight_decay=0.01),
}


def run_shipped(backend, dtype, kw, device="cuda", steps=3):
    """Parameters (float64, on the CPU) before and after ``steps`` steps of ``ofmu.OFMU``."""
    m = mlp(dtype, device)
    start = torch.cat([p.detach().double().cpu().flatten() for p in m.parameters()])
    opt = ofmu.OFMU(m.parameters(), backend=backend, **kw)
    s = DeviceStream(m, dtype=dtype, device=device)
    for _ in range(steps):
        opt.step(s)
    assert opt.last_stats()["skipped_steps"] == 0
    return torch.cat([p.detach().double().cpu().flatten() for p in m.parameters()]), start


class DeviceStream(BatchStream):
    def __init__(self, model, device, **kw):
        super().__init__(model, **kw)
        self.device = device

    def __call__(self, same_batch=False):
        if not same_batch:
            self.i += 1
        xf, yf, xr, yr = (t.to(self.device) for t in self.batch(self.i))
        return ce(self.model(xf), yf), ce(self.model(xr), yr)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_options_match_the_torch_backend(backend, config):
    """fp32: within 1e-3 of the displacement of the torch backend's result on the same GPU (CPU
    calibration, C++ kernels against the torch backend: 5e-6 to 4e-5)."""
    got, start = run_shipped(backend, torch.float32, SHIPPED[config])
    want, _ = run_shipped("torch", torch.float32, SHIPPED[config])
    assert (got - want).norm() <= 1e-3 * (want - start).norm()


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("config", SHIPPED)
def test_fp16_buffers_err_no_more_than_the_torch_backend(backend, config):
    """fp16 parameters: the rounding of theta dominates, so the rule is flash-attention's: at
    most 2x the torch backend's distance (fp16, same GPU) from the float64 run."""
    want, start = run_shipped("torch", torch.float64, SHIPPED[config])
    got, _ = run_shipped(backend, torch.float16, SHIPPED[config])
    base, _ = run_shipped("torch", torch.float16, SHIPPED[config])
    assert (got - want).norm() <= 2 * (base - want).norm() + 1e-2 * (want - start).norm()


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
def test_shipped_adam_at_small_lr_matches_the_torch_backend(backend):
    """The defaults as shipped (Adam per loop) at lr 1e-4, where a flipped Adam coordinate
    moves by 1e-4 only (CPU calibration, C++ kernels against torch: 2e-5 of the displacement)."""
    kw = dict(rho=0.1, lr=1e-4)
    got, start = run_shipped(backend, torch.float32, kw)
    want, _ = run_shipped("torch", torch.float32, kw)
    assert (got - want).norm() <= 1e-3 * (want - start).norm()


def device_closure(m, n=80, dtype=torch.float32):
    """A closure over batches already on the GPU (a pageable host-to-device copy would sync);
    ``same_batch=True`` reuses the last one, as ``outer_hvp="fd"`` asks."""
    src = BatchStream(m, dtype=dtype)
    batches = [tuple(t.cuda() for t in src.batch(i)) for i in range(n)]
    it = iter(batches)
    last = [None]

    def closure(same_batch=False):
        if not same_batch or last[0] is None:
            last[0] = next(it)
        xf, yf, xr, yr = last[0]
        return ce(m(xf), yf), ce(m(xr), yr)
    return closure


SYNC_FREE = {"defaults": {}, "fd-penalty": dict(rho=0.1),
             "options": dict(rho=0.1, max_grad_norm=1.0, weight_decay=0.01,
                             inner_preconditioner="sign")}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("config", SYNC_FREE)
def test_default_step_has_no_host_sync(backend, config):
    m = mlp(torch.float32)
    opt = ofmu.OFMU(m.parameters(), backend=backend, **SYNC_FREE[config])
    closure = device_closure(m)
    opt.step(closure)  # warm-up: lazy allocations and kernel compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.last_stats()["skipped_steps"] == 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_whole_default_step_replays_in_a_cuda_graph(backend):
    """One ``opt.step(closure)`` of the defaults (forward, backward, inner and outer loops,
    Adam) captured in a CUDA graph, replayed on new batches copied into the static inputs: the
    same parameters as the same steps run eagerly."""
    src = BatchStream(mlp(torch.float32), dtype=torch.float32)
    batches = [tuple(t.cuda() for t in src.batch(i)) for i in range(6)]

    def make():
        m = mlp(torch.float32)
        static = [t.clone() for t in batches[0]]

        def closure(same_batch=False):
            xf, yf, xr, yr = static
            return ce(m(xf), yf), ce(m(xr), yr)
        return m, ofmu.OFMU(m.parameters(), backend=backend, rho=0.1), static, closure

    eager, graphed = make(), make()

    def feed(i):
        for _, _, static, _ in (eager, graphed):
            for s, b in zip(static, batches[i]):
                s.copy_(b)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as the CUDA graphs docs ask
        for i in range(2):
            feed(i)
            for _, opt, _, closure in (eager, graphed):
                opt.step(closure)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed[1].step(graphed[3])
    for i in range(2, 6):
        feed(i)
        eager[1].step(eager[3])
        g.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager[0].parameters(), graphed[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    moved = sum((p - q).abs().sum() for p, q in zip(eager[0].parameters(), mlp(torch.float32)
                                                    .parameters()))
    assert moved > 0  # the replays did step


# ------------------------------------------------------------ buffers on several devices at once


class Split(torch.nn.Module):
    """The MLP with its two layers on two devices (activations follow)."""

    def __init__(self, dev_a, dev_b, dtype=torch.float32):
        super().__init__()
        ref = mlp(dtype, "cpu")
        self.a, self.b = ref[0].to(dev_a), ref[2].to(dev_b)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.device))).to(self.b.weight.device))


def run_split(dev_a, dev_b, backend="auto", steps=3):
    m = Split(dev_a, dev_b)
    start = torch.cat([p.detach().double().cpu().flatten() for p in m.parameters()])
    groups = [dict(params=list(m.a.parameters())), dict(params=list(m.b.parameters()))]
    opt = ofmu.OFMU(groups, backend=backend, **SHIPPED["defaults"])
    s = DeviceStream(m, dtype=torch.float32, device=dev_b)  # the loss's device; Split moves x
    for _ in range(steps):
        # A CUDA part that finishes late makes a CPU read of a copy that has not landed stale.
        torch.cuda._sleep(10**7)
        opt.step(s)
    return torch.cat([p.detach().double().cpu().flatten() for p in m.parameters()]), start


@pytest.mark.parametrize("order", ["cpu-first", "cuda-first"])
def test_cpu_and_cuda_parameter_groups_in_one_optimizer(order):
    """The cosine, the projection and the skip decision are global over devices: the per-buffer
    statistics of a CUDA buffer must land before a CPU buffer uses them. Same result as the
    model wholly on the CPU (SGD form; CPU calibration of C++ against torch kernels: 4e-5)."""
    devs = ("cpu", "cuda") if order == "cpu-first" else ("cuda", "cpu")
    got, start = run_split(*devs)
    want, _ = run_split("cpu", "cpu", backend="torch")
    assert (got - want).norm() <= 1e-3 * (want - start).norm()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_devices_in_one_optimizer():
    got, start = run_split("cuda:0", "cuda:1")
    want, _ = run_split("cpu", "cpu", backend="torch")
    assert (got - want).norm() <= 1e-3 * (want - start).norm()
