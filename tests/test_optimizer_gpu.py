"""The whole optimizer on a CUDA device (skipped without one; run by benchmarks/gpu_check.sh)."""

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
