"""The optimizer core's second-pass contract: scale-invariant directions (each epsilon relative
to its own denominator), hyperparameters validated at every step, per-parameter state that
checkpoints by parameter (shape-checked, nothing but optimizer state written), mode records."""

import copy
import math

import ofmu
import pytest
import torch
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu.modes import OUTER_HVP, SIMILARITY, step_cost
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict


def _inner_displacement(similarity, forget_scale, retain_scale, beta=0.8):
    """theta after one SGD inner step minus theta before (= inner_lr * u), float64."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    yf, yr = torch.randint(0, 3, (16,)), torch.randint(0, 3, (16,))
    ce = torch.nn.functional.cross_entropy
    opt = OFMU(m.parameters(), lr=0.1, inner_steps=1, beta=beta, rho=0.0, similarity=similarity)
    before = torch.cat([p.detach().flatten() for p in m.parameters()])
    opt.inner_step(lambda: (forget_scale * ce(m(x), yf), retain_scale * ce(m(x[:8]), yr[:8])))
    return torch.cat([p.detach().flatten() for p in m.parameters()]) - before


@pytest.mark.parametrize("similarity", ["project", "none"])
@pytest.mark.parametrize("forget_scale,retain_scale", [(1e-6, 1.0), (1e8, 1.0), (1.0, 1e-6),
                                                       (1.0, 1e8), (1e8, 1e-6)])
def test_scaling_a_loss_leaves_the_direction_unchanged(similarity, forget_scale, retain_scale):
    """u/|u| is invariant to positive loss scales. A shared epsilon eps*(|g_f|^2 + |g_r|^2)
    made the projection vanish once |g_f| >> |g_r| (the normal state while ascending)."""
    base = _inner_displacement(similarity, 1.0, 1.0)
    got = _inner_displacement(similarity, forget_scale, retain_scale)
    cos = torch.dot(base, got) / (base.norm() * got.norm())
    assert 1.0 - cos.item() <= 1e-12
    torch.testing.assert_close(got / got.norm(), base / base.norm(), rtol=0, atol=1e-9)


def test_projection_keeps_working_when_the_forget_gradient_dominates():
    """beta = 1 with |g_f| ~ 1e8 |g_r|: the step stays orthogonal to g_r up to the relative
    epsilon (<u, g_r> = d * eps / (1 + eps) with eps = 1e-12) and float64 rounding. With the
    old shared epsilon the projection vanished here and <u, g_r> was ~d."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    af, ar = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    opt = OFMU([p], lr=1.0, inner_steps=1, beta=1.0, rho=0.0)
    before = p.detach().clone()
    opt.inner_step(lambda: (1e8 * (af * p).sum(), (ar * p).sum()))
    step = p.detach() - before
    assert abs(torch.dot(step, ar).item()) <= 1e-11 * step.norm().item() * ar.norm().item()


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), "lr must be finite"), ("lr", -1.0, "lr must be finite and >= 0"),
    ("beta", 5.0, "beta must be <= 1"), ("inner_lr", float("inf"), "inner_lr"),
    ("betas", (0.9, 1.5), "betas"), ("max_grad_norm", 0.0, "max_grad_norm")])
def test_hyperparameters_edited_after_construction_are_validated_at_step(key, value, match):
    p = torch.nn.Parameter(torch.ones(3))
    opt = OFMU([p], lr=0.1, inner_steps=1, rho=0.0)
    opt.param_groups[0][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step(lambda: ((p * p).sum(), (p - 1).pow(2).sum()))
    assert torch.equal(p.detach(), torch.ones(3))  # nothing moved before the error


def _adam_model(shapes, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = OFMU(params, lr=1e-2, inner_steps=1, rho=0.0, preconditioner="adam")

    def closure():
        lf = sum((q * q).sum() for q in params)
        return lf, sum((q - 1).pow(2).sum() for q in params)
    return params, opt, closure


def test_state_is_per_parameter_views_into_the_flat_moments():
    params, opt, closure = _adam_model([(3, 4), (5,)])
    opt.step(closure)
    for p in params:
        st = opt.state[p]
        assert st["inner_exp_avg"].shape == p.shape and st["outer_exp_avg_sq"].shape == p.shape
        assert st["outer_step"].item() == 1.0 and st["inner_step"].item() == 1.0
        assert st["outer_exp_avg"].abs().sum() > 0
    buf = opt.flat_buffers[0]
    assert opt.state[params[0]]["outer_exp_avg"].untyped_storage().data_ptr() == \
        buf.buffer("outer_exp_avg")[0].untyped_storage().data_ptr()


def test_checkpoint_from_a_model_with_the_same_flat_size_is_rejected():
    """(3, 4) + (5,) and (4, 3) + (5,) pad to the same flat buffer; shapes tell them apart."""
    _, a, ca = _adam_model([(3, 4), (5,)])
    a.step(ca)
    _, b, _ = _adam_model([(4, 3), (5,)])
    assert a.flat_buffers[0].numel == b.flat_buffers[0].numel
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*shape \(4, 3\).*different model"):
        b.load_state_dict(a.state_dict())


def test_checkpoint_entries_cannot_write_parameters_or_gradients():
    params, opt, closure = _adam_model([(3, 4), (5,)])
    opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["param"] = torch.full((3, 4), 1e6)
    weights = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"unknown entries \['param'\]"):
        opt.load_state_dict(sd)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_old_flat_format_checkpoint_fails_clearly():
    _, opt, closure = _adam_model([(3, 4)])
    sd = opt.state_dict()
    sd["ofmu"] = {"moments": [{"inner_exp_avg": torch.zeros(64)}], "adam_steps": {}}
    with pytest.raises(ValueError, match="ofmu 0.1.0"):
        opt.load_state_dict(sd)


def test_round_trip_through_torch_distributed_checkpoint_state_dict_api():
    """``get_optimizer_state_dict`` keys state by parameter name; loading it into a fresh
    optimizer continues bit-identically."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m2 = copy.deepcopy(m)
    kw = dict(lr=1e-2, inner_steps=1, rho=0.0, preconditioner="adam")
    x = torch.randn(6, 4)

    def closure_for(model):
        return lambda: (model(x).pow(2).mean(), (model(x) - 1).pow(2).mean())
    opt = OFMU(m.parameters(), **kw)
    opt.step(closure_for(m))
    sd = get_optimizer_state_dict(m, opt)
    assert set(sd["state"]["0.weight"]) >= {"inner_exp_avg", "outer_exp_avg_sq", "outer_step"}
    m2.load_state_dict(m.state_dict())
    opt2 = OFMU(m2.parameters(), **kw)
    set_optimizer_state_dict(m2, opt2, sd)
    opt.step(closure_for(m))
    opt2.step(closure_for(m2))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_sgd_optimizer_state_dict_through_dcp_api_before_any_step():
    m = torch.nn.Linear(4, 2)
    opt = OFMU(m.parameters(), lr=0.1, rho=0.0)
    sd = get_optimizer_state_dict(m, opt)  # would call step(None) if p.grad were unset
    assert sd["state"] == {} and sd["param_groups"][0]["params"] == ["weight", "bias"]


def test_mode_records_drive_double_backward():
    proj, hvp = SIMILARITY["project"], SIMILARITY["hvp"]
    assert not OUTER_HVP["fd"].double_backward(proj) and OUTER_HVP["fd"].double_backward(hvp)
    assert OUTER_HVP["forget"].double_backward(proj) and not OUTER_HVP["none"].double_backward(hvp)
    assert OUTER_HVP["exact"].graphs(SIMILARITY["none"]) == (True, False)
    # the convention for second-order modes (not measurable as below): a double backward is
    # charged as one gradient evaluation; v costs 3 with hvp, and each fd probe of u 3 more
    assert step_cost(hvp, OUTER_HVP["fd"], 0, 1, penalty_on=True) == 3 + 6


class _Net(torch.nn.Module):
    """An MLP whose first layer's input requires grad (through ``scale``), so that a backward
    pass costs twice its forward pass in matmul FLOPs, as a gradient evaluation is counted."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.a, self.b = torch.nn.Linear(8, 16).double(), torch.nn.Linear(16, 4).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x * self.scale)))


def _matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


FIRST_ORDER = [(s, h, rho) for s in ("project", "none") for h in OUTER_HVP for rho in (0.0, 0.1)
               if not (rho > 0 and OUTER_HVP[h].double_backward(SIMILARITY[s]))]


@pytest.mark.parametrize("similarity,outer_hvp,rho", FIRST_ORDER)
def test_step_cost_is_what_a_first_order_step_spends(similarity, outer_hvp, rho):
    """``modes.step_cost`` (what the studies' budgets charge) against the matmul FLOPs a real
    step runs, in gradient evaluations (one forward and backward pass of one minibatch): an
    inner step backpropagates both losses, an outer step without the penalty runs both forward
    passes and the retain backward, fd's probes cost one u each."""
    torch.manual_seed(0)
    m = _Net()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    ce = torch.nn.functional.cross_entropy
    evaluation = _matmul_flops(lambda: ce(m(x), y).backward())
    opt = ofmu.OFMU(m.parameters(), lr=1e-3, inner_steps=2, outer_steps=3, similarity=similarity,
                    outer_hvp=outer_hvp, rho=rho, beta=0.5, process_group=None)
    spent = _matmul_flops(lambda: opt.step(lambda: (ce(m(x), y), ce(m(x), y))))
    cost = step_cost(SIMILARITY[similarity], OUTER_HVP[outer_hvp], 2, 3, penalty_on=rho > 0)
    assert spent / evaluation == pytest.approx(cost, rel=1e-12)


def test_last_stats_has_the_same_keys_whatever_the_configuration():
    p = torch.nn.Parameter(torch.ones(3))
    keys = None
    for kw in (dict(rho=0.0), dict(rho=0.1, outer_hvp="forget"), dict(inner_steps=0, rho=0.0)):
        opt = OFMU([p], lr=0.01, **{"inner_steps": 1, **kw})
        opt.step(lambda: ((p * p).sum(), (p - 1).pow(2).sum()))
        st = opt.last_stats()
        keys = keys or set(st)
        assert set(st) == keys
    assert math.isnan(st["inner_cosine"]) and math.isnan(st["cosine"])  # the last config
    assert st["retain_grad_norm"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fold_every", [1, 3, 64, 1 << 20])
def test_skip_and_cap_counts_are_exact_across_folds_and_checkpoints(monkeypatch, fold_every,
                                                                    dtype):
    """The counters: every non-finite update counted as skipped, every inner update at or above
    the forget-loss cap as capped, in last_stats() and in the checkpoint (int64), across the
    folds of the pending flag sums into the tally and a checkpoint round trip."""
    monkeypatch.setattr(ofmu.functional, "_FOLD_EVERY", fold_every)
    p = torch.nn.Parameter(torch.ones(3, dtype=dtype))

    def run(opt, ks):  # forget loss NaN at k % 4 == 1 (skipped), 300 >= cap at k % 4 == 2
        for k in ks:
            opt.inner_step(lambda k=k: ((p * p).sum() * (float("nan") if k % 4 == 1 else
                                                         100.0 if k % 4 == 2 else 1.0),
                                        (p - 1).pow(2).sum()))

    opt = OFMU([p], lr=1e-3, forget_loss_cap=10.0, preconditioner="sgd")
    run(opt, range(7))
    sd = opt.state_dict()
    assert sd["ofmu"]["skipped_steps"].dtype == torch.int64
    assert (int(sd["ofmu"]["skipped_steps"]), int(sd["ofmu"]["capped_steps"])) == (2, 2)
    fresh = OFMU([p], lr=1e-3, forget_loss_cap=10.0, preconditioner="sgd")
    fresh.load_state_dict(sd)
    run(fresh, range(7, 14))
    stats = fresh.last_stats()
    assert (stats["skipped_steps"], stats["capped_steps"]) == (4, 3)
    nocap = OFMU([p], lr=1e-3, forget_loss_cap=None, preconditioner="sgd")
    run(nocap, range(3))
    assert set(nocap.state_dict()["ofmu"]) == {"skipped_steps"}  # never counted: no key


def test_sign_inner_preconditioner_is_stateless_adam():
    """inner_preconditioner='sign' equals one step of torch.optim.Adam(betas=(0, 0), maximize)
    on u (= g_f with beta = 0), weight decay as Adam's L2 term, whatever the step count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, dtype=torch.float64, generator=g)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=g))
    q = torch.nn.Parameter(p.detach().clone())
    opt = OFMU([p], lr=0.05, inner_steps=1, beta=0.0, rho=0.0, weight_decay=0.1,
               preconditioner="adam", inner_preconditioner="sign", adam_eps=1e-3)
    ref = torch.optim.Adam([q], lr=0.05, betas=(0.0, 0.0), eps=1e-3, weight_decay=0.1,
                           maximize=True)
    for _ in range(3):
        opt.inner_step(lambda: ((a * p).sum() + 0.5 * (p * p).sum(), (p - 1).pow(2).sum()))
        ref.zero_grad()
        ((a * q).sum() + 0.5 * (q * q).sum()).backward()
        ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-15)
    assert set(opt.state[p]) == {"outer_exp_avg", "outer_exp_avg_sq", "outer_step"}
    before = p.detach().clone()  # a non-finite step leaves theta untouched, and is counted
    opt.inner_step(lambda: ((a * p).sum() * float("nan"), (p - 1).pow(2).sum()))
    assert torch.equal(p.detach(), before) and opt.last_stats()["skipped_steps"] == 1


def test_adam_state_bytes_per_parameter():
    """Optimizer-side storage per fp32 parameter: g_f, g_r and the moments of each Adam loop;
    the direction is formed in place (no extra buffer)."""
    def bytes_per_param(**kw):
        m = torch.nn.Linear(64, 64)
        opt = ofmu.OFMU(m.parameters(), lr=1e-3, **kw)  # the defaults: Adam, rho = 0
        x = torch.randn(8, 64)
        opt.step(lambda: (m(x).pow(2).mean(), (m(x) - 1).pow(2).mean()))
        buf = opt.flat_buffers[0]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for slot in buf._slots if slot.value != "param" for t in [buf.flat(slot)]}
        return sum(storages.values()) / buf.numel
    assert bytes_per_param() == 24  # 2 gradients + 2 loops x (m, v)
    assert bytes_per_param(inner_preconditioner="sign") == 16
    assert bytes_per_param(preconditioner="sgd") == 8


def test_closure_told_to_skip_the_unused_forget_forward():
    """Without the penalty the outer step does not use the forget loss: a closure that accepts
    ``need_forget`` is called with False and may return None for it; the step is unchanged."""
    torch.manual_seed(0)
    m1 = torch.nn.Linear(4, 3)
    m2 = copy.deepcopy(m1)
    x, calls = torch.randn(5, 4), []

    def plain():
        return m1(x).pow(2).mean(), (m1(x) - 1).pow(2).mean()

    def lazy(need_forget=True):
        calls.append(need_forget)
        return (m2(x).pow(2).mean() if need_forget else None), (m2(x) - 1).pow(2).mean()

    kw = dict(lr=1e-2, inner_steps=1, outer_steps=3, rho=0.0, preconditioner="adam")
    o1, o2 = OFMU(m1.parameters(), **kw), OFMU(m2.parameters(), **kw)
    for _ in range(2):
        o1.step(plain)
        o2.step(lazy)
    assert calls == [True, False, False, False] * 2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    with pytest.raises(TypeError, match="forget_loss returned by the closure must be a Tensor"):
        o2.inner_step(lambda need_forget=True: (None, (m2(x) - 1).pow(2).mean()))


def test_rebuild_follows_parameters_replaced_before_the_first_step():
    """A wrapper may put new tensors into param_groups before the first step (accelerate's FSDP2
    prepare): the step rebuilds the buffers on them (OFMU.rebuild) and updates them, not the old
    ones; once steps were taken, replacing them is refused with the fix."""
    torch.manual_seed(0)
    old, new = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ce = torch.nn.functional.cross_entropy
    opt = ofmu.OFMU(old.parameters(), lr=1e-2)
    old_values = [p.detach().clone() for p in old.parameters()]
    new_values = [p.detach().clone() for p in new.parameters()]
    opt.param_groups[0]["params"] = list(new.parameters())
    opt.step(lambda: (ce(new(x[:4]), y[:4]), ce(new(x[4:]), y[4:])))
    assert [p for b in opt.flat_buffers for p in b.params] == list(new.parameters())
    assert set(opt.state) == set(new.parameters())
    assert all(torch.equal(p, v) for p, v in zip(old.parameters(), old_values))
    assert all(not torch.equal(p, v) for p, v in zip(new.parameters(), new_values))
    opt.param_groups[0]["params"] = list(old.parameters())
    with pytest.raises(RuntimeError, match="replaced after OFMU took steps"):
        opt.step(lambda: (ce(old(x[:4]), y[:4]), ce(old(x[4:]), y[4:])))
