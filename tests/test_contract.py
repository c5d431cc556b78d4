"""The drop-in optimizer contract: state, schedulers, groups, dtypes, errors, non-finite safety."""

import copy
import math
import warnings

import pytest
import torch
from _reference import BatchStream, ReferenceOFMU
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu.flat import FlatBuffer

ce = torch.nn.functional.cross_entropy


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(dtype)


def ref_group(model, **hp):
    """A param group for the reference with OFMU's defaults for what ``hp`` leaves out."""
    base = dict(rho=0.1, rho_growth=1.0, rho_max=1.0, weight_decay=0.0, max_grad_norm=None)
    return dict(params=list(model.parameters()), **{**base, **hp})


def flat_params(m):
    return torch.cat([p.detach().flatten().double() for p in m.parameters()])


@pytest.mark.parametrize("similarity,outer_hvp", [("project", "forget"), ("hvp", "fd")])
def test_state_dict_round_trip_gives_identical_continuation(similarity, outer_hvp):
    kw = dict(lr=0.1, inner_lr=0.05, inner_steps=2, beta=0.5, rho=0.1, rho_growth=1.7,
              rho_max=0.5, similarity=similarity, outer_hvp=outer_hvp)
    m = mlp()
    stream = BatchStream(m, dtype=torch.float32)
    opt = OFMU(m.parameters(), **kw)
    for _ in range(3):
        opt.step(stream)
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    saved_i = stream.i
    for _ in range(3):
        opt.step(stream)

    m2 = mlp(seed=123)  # different init: everything must come from the checkpoint
    opt2 = OFMU(m2.parameters(), **dict(kw, rho=9.0))
    m2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    stream2 = BatchStream(m2, dtype=torch.float32)
    stream2.i = saved_i
    for _ in range(3):
        opt2.step(stream2)
    assert torch.equal(flat_params(m), flat_params(m2))
    assert opt.param_groups[0]["rho_k"] == opt2.param_groups[0]["rho_k"]
    assert opt.param_groups[0]["k"] == opt2.param_groups[0]["k"] == 6


def test_lr_scheduler_scales_both_loops():
    """StepLR acts on lr; an explicit inner_lr is scaled by the same factor."""
    m, mref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = OFMU(m.parameters(), lr=0.2, inner_lr=0.05, inner_steps=1, beta=0.3, rho=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = ReferenceOFMU([ref_group(mref, lr=0.2, inner_lr=0.05, beta=0.3)], inner_steps=1)
    s1, s2 = BatchStream(m), BatchStream(mref)
    for _ in range(3):
        opt.step(s1)
        sched.step()
        ref.step(s2)
        ref.groups[0]["lr"] *= 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 8)
    assert (flat_params(m) - flat_params(mref)).norm() < 1e-10 * flat_params(mref).norm()


def test_frozen_parameters_are_left_alone():
    m = mlp()
    m[0].weight.requires_grad_(False)
    frozen = m[0].weight.detach().clone()
    others = [p.detach().clone() for p in list(m.parameters())[1:]]
    opt = OFMU(m.parameters(), lr=0.1, inner_steps=1)
    opt.step(BatchStream(m, dtype=torch.float32))
    assert torch.equal(m[0].weight, frozen)
    assert all(not torch.equal(p, q) for p, q in zip(list(m.parameters())[1:], others))


def test_mixed_dtypes_get_one_buffer_each_and_match_reference():
    class Net(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.a, self.b = torch.nn.Linear(4, 7).double(), torch.nn.Linear(7, 3).float()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.double())).float()).double()

    m, mref = Net(0), Net(0)
    opt = OFMU(m.parameters(), lr=0.1, inner_lr=0.05, inner_steps=2, beta=0.4, rho=0.1)
    assert len(opt.backend_summary()) == 2
    ref = ReferenceOFMU([ref_group(mref, lr=0.1, inner_lr=0.05, beta=0.4)], inner_steps=2)
    s, sref = BatchStream(m), BatchStream(mref)
    for _ in range(3):
        opt.step(s)
        ref.step(sref)
    err = (flat_params(m) - flat_params(mref)).norm() / flat_params(mref).norm()
    assert 0 <= err < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_track_fp32_with_fp32_accumulation(dtype):
    """Half-precision buffers stay within the rounding of their dtype of an fp32 run, and the
    reductions are accumulated in fp32 (the cosine matches the fp32 run closely)."""
    m16, m32 = mlp(1, dtype), mlp(1, torch.float32)
    with torch.no_grad():  # same starting point: the fp32 model holds the rounded values
        for p, q in zip(m32.parameters(), m16.parameters()):
            p.copy_(q.float())
    # steps large against theta, so that rounding theta to the half dtype (unavoidable) does
    # not hide a wrong step: with beta dropped the error below is ~0.28, 5x over the bound
    kw = dict(lr=0.5, inner_lr=0.3, inner_steps=2, beta=0.5, rho=0.1)
    o16, o32 = OFMU(m16.parameters(), **kw), OFMU(m32.parameters(), **kw)
    s16, s32 = BatchStream(m16, dtype=dtype), BatchStream(m32, dtype=torch.float32)
    start = flat_params(m32)
    o16.step(s16)
    o32.step(s32)
    delta32 = flat_params(m32) - start
    err = (flat_params(m16) - flat_params(m32)).norm() / delta32.norm()
    unit = torch.finfo(dtype).eps
    assert err < unit * start.norm() / delta32.norm()  # measured: ~0.35 of that
    assert abs(o16.last_stats()["cosine"] - o32.last_stats()["cosine"]) < 0.05


# ----------------------------------------------------------------------------------- errors


def test_closure_errors_name_the_culprit():
    m = mlp()
    opt = OFMU(m.parameters())
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"\(forget_loss, retain_loss\).*single Tensor"):
        opt.step(lambda: m(x).sum())
    with pytest.raises(TypeError, match="sequence of 3"):
        opt.step(lambda: (m(x).sum(), m(x).sum(), m(x).sum()))
    with pytest.raises(ValueError, match=r"retain_loss.*scalar.*\(3, 3\)"):
        opt.step(lambda: (m(x).sum(), m(x)))
    with pytest.raises(ValueError, match="forget_loss.*does not require grad"):
        opt.step(lambda: (m(x).sum().detach(), m(x).sum()))
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(lr=-1.0), "lr must be finite and >= 0"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=1.5), "beta must be <= 1 with similarity='project'"),
    (dict(rho=float("inf")), "rho must be finite"),
    (dict(rho_growth=0.5), "rho_growth must be >= 1"),
    (dict(inner_lr=-0.1), "inner_lr"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be finite and > 0"),
    (dict(similarity="cosine"), "unknown similarity mode 'cosine'"),
    (dict(outer_hvp="hessian"), "unknown outer_hvp mode 'hessian'"),
    (dict(inner_steps=-1), "inner_steps"),
    (dict(backend="opencl"), "unknown backend 'opencl'"),
])
def test_bad_hyperparameters_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OFMU(mlp().parameters(), **kwargs)


def test_hvp_mode_allows_beta_above_one_and_groups_are_validated():
    OFMU(mlp().parameters(), beta=2.0, similarity="hvp")
    m = mlp()
    with pytest.raises(ValueError, match=r"beta.*param group 1"):
        OFMU([{"params": [m[0].weight]}, {"params": [m[2].weight], "beta": 3.0}])
    with pytest.raises(ValueError, match="'similarity' is a per-optimizer setting"):
        OFMU([{"params": m.parameters(), "similarity": "hvp"}])
    with pytest.raises(TypeError, match="lr must be a number"):
        OFMU(m.parameters(), lr="0.1")


def test_sparse_gradients_are_rejected_naming_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = OFMU(emb.parameters())
    idx = torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"params\[0\].*sparse gradient"):
        opt.step(lambda: (emb(idx).sum(), emb(idx).pow(2).sum()))


def test_one_flat_buffer_holds_one_device():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"parameter p1 is on meta but p0 is on cpu"):
        FlatBuffer([a, b], ["p0", "p1"])


def test_storage_replaced_behind_the_optimizer_is_detected():
    m = mlp()
    opt = OFMU(m.parameters())
    m.double()
    with pytest.raises(RuntimeError, match=r"params\[0\].*no longer lives in the optimizer's flat"):
        opt.step(BatchStream(m))


# ---------------------------------------------------------------------- non-finite safety


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("where", ["inner", "outer"])
@pytest.mark.parametrize("similarity", ["project", "hvp"])
def test_non_finite_loss_skips_update_and_is_counted(backend, where, similarity):
    m = mlp()
    opt = OFMU(m.parameters(), lr=0.1, inner_steps=1, similarity=similarity, backend=backend)
    x = torch.randn(5, 4)
    y = torch.randint(0, 3, (5,))
    before = flat_params(m)
    calls = []

    def closure():
        calls.append(1)
        poison = (where == "inner") == (len(calls) == 1)
        lf = ce(m(x), y) * (float("nan") if poison else 1.0)
        return lf, ce(m(x), 1 - y.clamp(max=1))

    opt.step(closure)
    stats = opt.last_stats()
    assert stats["skipped_steps"] == 1
    after = flat_params(m)
    if where == "inner":
        assert not torch.equal(after, before)  # the outer step still ran
    assert torch.isfinite(after).all()
    # the skipped step touched nothing: replay only the healthy step on a copy
    m2 = mlp()
    opt2 = OFMU(m2.parameters(), lr=0.1, inner_steps=0, similarity=similarity, backend=backend)
    if where == "inner":
        opt2.outer_step(lambda: (ce(m2(x), y), ce(m2(x), 1 - y.clamp(max=1))))
    else:
        opt2.inner_step(lambda: (ce(m2(x), y), ce(m2(x), 1 - y.clamp(max=1))))
    assert torch.equal(after, flat_params(m2))


def test_inf_in_one_gradient_element_is_caught():
    p = torch.nn.Parameter(torch.ones(5))
    opt = OFMU([p], lr=0.1, inner_steps=0, rho=0.0)
    mask = torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0])
    opt.step(lambda: ((p * p).sum(), (p * mask).sum()))
    assert torch.equal(p.detach(), torch.ones(5))
    assert opt.last_stats()["skipped_steps"] == 1


# ------------------------------------------------------------------------- misc contract


def test_step_is_inner_steps_then_outer_and_returns_retain_loss():
    a, b = mlp(3), mlp(3)
    kw = dict(lr=0.1, inner_lr=0.03, inner_steps=2, beta=0.4, rho=0.2)
    oa, ob = OFMU(a.parameters(), **kw), OFMU(b.parameters(), **kw)
    sa, sb = BatchStream(a, dtype=torch.float32), BatchStream(b, dtype=torch.float32)
    loss = oa.step(sa)
    ob.inner_step(sb)
    ob.inner_step(sb)
    loss_b = ob.outer_step(sb)
    assert torch.equal(flat_params(a), flat_params(b))
    assert loss.shape == () and not loss.requires_grad and torch.equal(loss, loss_b)


def test_zero_grad_keeps_flat_views_and_grads_show_retain_gradient():
    m = mlp()
    opt = OFMU(m.parameters(), inner_steps=0, rho=0.0)
    s = BatchStream(m, dtype=torch.float32)
    opt.step(s)
    buf = opt.flat_buffers[0]
    lo, hi = buf.grad_r.data_ptr(), buf.grad_r.data_ptr() + buf.grad_r.numel() * 4
    assert all(lo <= p.grad.data_ptr() < hi for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    assert all(lo <= p.grad.data_ptr() < hi for p in m.parameters())


def test_diagnostics_match_closed_forms():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    af = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    ar = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    opt = OFMU([p], lr=0.0, inner_steps=0, rho=0.5, rho_growth=2.0, similarity="none")
    opt.step(lambda: ((af * p).sum(), (ar * p).sum()))
    st = opt.last_stats()
    assert st["cosine"] == pytest.approx(2.0 / (math.sqrt(5) * math.sqrt(10)), rel=1e-12)
    assert st["forget_grad_norm"] == pytest.approx(math.sqrt(5), rel=1e-12)
    assert st["retain_grad_norm"] == pytest.approx(math.sqrt(10), rel=1e-12)
    assert st["grad_phi_sq"] == pytest.approx(5.0, rel=1e-12)
    assert st["rho"] == 0.5 and opt.param_groups[0]["rho_k"] == 1.0


def test_max_grad_norm_clips_the_step():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    g = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    opt = OFMU([p], lr=1.0, inner_steps=0, rho=0.0, max_grad_norm=1.0)
    opt.step(lambda: ((p * p).sum(), (g * p).sum()))
    assert p.detach().norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(p.detach(), -g / 5, rtol=1e-5, atol=0)


# ------------------------------------------------------------------- Adam preconditioning


def _two_batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(40)]


def test_adam_preconditioner_is_torch_adam_per_loop():
    """beta = rho = 0: T Adam ascent steps on L_f (own moments), then an Adam descent step on
    L_r (own moments): the same as two torch.optim.Adam instances, one with maximize=True."""
    a, b = mlp(5), mlp(5)
    data = _two_batches(6)
    kw = dict(lr=1e-2, inner_lr=3e-3, inner_steps=2, beta=0.0, rho=0.0, weight_decay=1e-3,
              preconditioner="adam", betas=(0.8, 0.99), adam_eps=1e-7)
    opt = OFMU(a.parameters(), **kw)
    it = iter(data)

    def closure():
        (xf, yf), (xr, yr) = next(it), next(it)
        return ce(a(xf), yf), ce(a(xr), yr)

    inner = torch.optim.Adam(b.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7,
                             weight_decay=1e-3, maximize=True)
    outer = torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                             weight_decay=1e-3)
    j = 0
    for _ in range(3):
        opt.step(closure)
        for t in range(3):
            (xf, yf), (xr, yr) = data[j], data[j + 1]
            j += 2
            o = inner if t < 2 else outer
            o.zero_grad()
            (ce(b(xf), yf) if t < 2 else ce(b(xr), yr)).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_adam_skip_leaves_moments_untouched_and_state_round_trips():
    m = mlp(7)
    kw = dict(lr=1e-2, inner_steps=1, beta=0.5, rho=0.1, preconditioner="adam")
    opt = OFMU(m.parameters(), **kw)
    s = BatchStream(m, dtype=torch.float32)
    opt.step(s)
    before = copy.deepcopy(opt.state_dict())
    params = flat_params(m)
    opt.step(lambda: (s()[0] * float("nan"), s()[1]))
    after = opt.state_dict()
    assert torch.equal(flat_params(m), params)
    assert before["state"].keys() == after["state"].keys() and before["state"]
    for i, st in before["state"].items():
        for name, t in st.items():
            assert torch.equal(t, after["state"][i][name]), (i, name)
    assert opt.last_stats()["skipped_steps"] == 2

    m2 = mlp(8)
    opt2 = OFMU(m2.parameters(), **kw)
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(opt.state_dict())
    s2 = BatchStream(m2, dtype=torch.float32)
    s2.i = s.i
    for _ in range(2):
        opt.step(s)
        opt2.step(s2)
    assert torch.equal(flat_params(m), flat_params(m2))


def test_outer_steps_repeat_the_outer_step():
    a, b = mlp(9), mlp(9)
    kw = dict(lr=0.1, inner_steps=1, beta=0.3, rho=0.2, rho_growth=1.5)
    oa = OFMU(a.parameters(), outer_steps=2, **kw)
    ob = OFMU(b.parameters(), **kw)
    sa, sb = BatchStream(a, dtype=torch.float32), BatchStream(b, dtype=torch.float32)
    oa.step(sa)
    ob.inner_step(sb)
    ob.outer_step(sb)
    ob.outer_step(sb)
    assert torch.equal(flat_params(a), flat_params(b))
    assert oa.param_groups[0]["rho_k"] == ob.param_groups[0]["rho_k"] == pytest.approx(0.45)


@pytest.mark.parametrize("rho,outer_hvp,forget_backwards", [
    (0.0, "forget", 2), (0.1, "none", 2), (0.1, "forget", 3)])
def test_outer_step_skips_the_forget_backward_without_penalty(rho, outer_hvp, forget_backwards):
    """2 inner steps always need g_f; the outer step needs it only for the rho penalty."""
    p = torch.nn.Parameter(torch.ones(3))
    count = []

    def closure():
        lf = (p * p).sum()
        lf.register_hook(lambda g: count.append(1))
        return lf, (p - 2).pow(2).sum()

    opt = OFMU([p], lr=0.1, inner_steps=2, rho=rho, outer_hvp=outer_hvp)
    opt.step(closure)
    assert len(count) == forget_backwards
    assert math.isfinite(opt.last_stats()["cosine"]) == (forget_backwards == 3)


@pytest.mark.parametrize("loss_shape", [(), (1,)])  # 0-dim: the engine call; (1,): public
def test_the_backward_pass_equals_autograd_backward_into_its_inputs_only(loss_shape):
    """``backward_into_leaves`` (the optimizer's plain backward pass) accumulates what
    ``torch.autograd.backward(loss, inputs=...)`` accumulates, bit for bit, into the inputs'
    existing gradients and nowhere else (a leaf outside ``inputs`` keeps no gradient)."""
    from ofmu.gradients import backward_into_leaves

    g = torch.Generator().manual_seed(0)
    w, b, other = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                   for shape in ((4, 3), (2, 3), (3,)))
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    grads = {}
    for run in ("ofmu", "torch"):
        for t in (w, b):
            t.grad = torch.ones_like(t)  # accumulated into, as the bound buffer slices are
        other.grad = None
        loss = ((x @ w + b.sum(0)) * other).tanh().pow(2).sum().reshape(loss_shape)
        if run == "ofmu":
            backward_into_leaves(loss, [w, b])
        else:
            torch.autograd.backward(loss, torch.ones_like(loss), inputs=[w, b])
        assert other.grad is None
        grads[run] = (w.grad.clone(), b.grad.clone())
    assert all(torch.equal(a, c) for a, c in zip(grads["ofmu"], grads["torch"]))
    assert not torch.equal(grads["ofmu"][0], torch.ones_like(w))


def test_a_parameter_with_an_exactly_zero_gradient_counts_as_reached():
    """Reached means autograd accumulated into the parameter's gradient, not that the gradient
    is nonzero: a parameter multiplied by zero is used by both losses, so no warning names it,
    and its gradient buffers hold exact zeros."""
    lin = torch.nn.Linear(3, 2)
    scaled = torch.nn.Parameter(torch.ones(2))
    opt = OFMU(list(lin.parameters()) + [scaled], lr=0.1, preconditioner="sgd")
    x = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: ((lin(x) + 0 * scaled).pow(2).mean(),
                          (lin(x) - 1 + 0 * scaled).pow(2).mean()))
    assert torch.equal(scaled.grad, torch.zeros(2)) and torch.equal(scaled.detach(), torch.ones(2))
    assert opt.last_stats()["skipped_steps"] == 0


@pytest.mark.parametrize("similarity,outer_hvp", [("project", "forget"), ("hvp", "exact"),
                                                  ("none", "fd")])
def test_unused_and_empty_parameters_are_harmless(similarity, outer_hvp):
    """A parameter outside both graphs and a 0-element one: zero gradients, never NaN."""
    lin = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.ones(4))
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    only_forget = torch.nn.Parameter(torch.ones(2))
    opt = OFMU(list(lin.parameters()) + [unused, empty, only_forget], lr=0.1, inner_steps=1,
               rho=0.1, similarity=similarity, outer_hvp=outer_hvp)
    x = torch.randn(5, 3)
    before = lin.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"1 parameter received no gradient.*params\[2\]"):  # `unused`
        opt.step(lambda: ((lin(x) * only_forget).pow(2).mean(), (lin(x) - 1).pow(2).mean()))
    assert torch.equal(unused.detach(), torch.ones(4))
    assert not torch.equal(lin.weight.detach(), before)
    assert torch.isfinite(only_forget).all() and not torch.equal(only_forget.detach(),
                                                                  torch.ones(2))
    assert opt.last_stats()["skipped_steps"] == 0
