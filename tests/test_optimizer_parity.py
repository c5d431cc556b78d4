"""Multi-step agreement of OFMU (flat buffers, backend ops) with the naive per-tensor reference."""

import copy

import pytest
import torch
from _reference import BatchStream, ReferenceOFMU
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu.modes import OUTER_HVP, SIMILARITY

MODES = [(s, h) for s in SIMILARITY for h in OUTER_HVP]  # every pair: a new mode is tested here


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(dtype)


def groups_for(model, g0, g1):
    p = list(model.parameters())
    return [dict(params=p[:2], **g0), dict(params=p[2:], **g1)]


HP0 = dict(lr=0.2, inner_lr=0.07, beta=0.6, rho=0.3, rho_growth=1.5, rho_max=0.6,
           weight_decay=0.01, max_grad_norm=None)
HP1 = dict(lr=0.1, inner_lr=None, beta=0.9, rho=0.1, rho_growth=2.0, rho_max=1.0,
           weight_decay=0.0, max_grad_norm=0.05)


def max_rel(a_params, b_params):
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(a_params, b_params))


@pytest.mark.parametrize("similarity,outer_hvp", MODES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_matches_reference_float64(similarity, outer_hvp, backend):
    m_opt, m_ref = mlp(), mlp()
    kw = dict(similarity=similarity, outer_hvp=outer_hvp, inner_steps=2)
    opt = OFMU(groups_for(m_opt, HP0, HP1), backend=backend, **kw)
    ref = ReferenceOFMU(groups_for(m_ref, dict(HP0), dict(HP1)), **kw)
    s_opt, s_ref = BatchStream(m_opt), BatchStream(m_ref)
    start = [p.detach().clone() for p in m_ref.parameters()]
    for _ in range(4):
        opt.step(s_opt)
        ref.step(s_ref)
    moved = max_rel(list(m_ref.parameters()), start)
    assert moved > 1e-3, "the test must move the parameters to mean anything"
    assert max_rel(list(m_opt.parameters()), list(m_ref.parameters())) < 1e-10
    assert [g["rho_k"] for g in opt.param_groups] == [g["rho_k"] for g in ref.groups]


class LoudForget(BatchStream):
    """The forget loss scaled by 300: |g_f| >> |g_r|, where a shared epsilon (eps times
    |g_f|^2 + |g_r|^2) and the documented one (eps times each denominator) part ways."""

    def __call__(self, same_batch=False):
        lf, lr = super().__call__(same_batch)
        return 300.0 * lf, lr


@pytest.mark.parametrize("outer_hvp", ["forget", "exact", "fd"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_large_eps_is_relative_to_each_denominator(outer_hvp, backend):
    """eps = 0.1 against the reference's own-denominator epsilons, at 1e-10: pins the documented
    epsilon (at the default 1e-12 any epsilon would pass). The projection and the cosine are
    closed forms; similarity='hvp' is left out: its seeds (coefficients.seed_coeffs) put the
    epsilon on their own denominators, O(eps) away from differentiating the cosine."""
    similarity = "project"
    m_opt, m_ref = mlp(), mlp()
    hp = dict(lr=0.05, inner_lr=2e-4, beta=1.0, rho=0.1, rho_growth=1.0, rho_max=1.0,
              weight_decay=0.0, max_grad_norm=None)
    kw = dict(similarity=similarity, outer_hvp=outer_hvp, inner_steps=2, eps=0.1)
    opt = OFMU([dict(params=list(m_opt.parameters()), **hp)], backend=backend, **kw)
    ref = ReferenceOFMU([dict(params=list(m_ref.parameters()), **hp)], **kw)
    s_opt, s_ref = LoudForget(m_opt), LoudForget(m_ref)
    start = [p.detach().clone() for p in m_ref.parameters()]
    for _ in range(3):
        opt.step(s_opt)
        ref.step(s_ref)
    assert max_rel(list(m_ref.parameters()), start) > 1e-3
    assert max_rel(list(m_opt.parameters()), list(m_ref.parameters())) < 1e-10


@pytest.mark.parametrize("similarity", ["project", "hvp"])
def test_float32_close_to_float64_reference(similarity):
    """fp32 buffers track the float64 reference to fp32 accuracy over several steps."""
    m32, m64 = mlp(dtype=torch.float32), mlp(dtype=torch.float64)
    kw = dict(similarity=similarity, outer_hvp="forget", inner_steps=2)
    opt = OFMU(groups_for(m32, HP0, HP1), **kw)
    ref = ReferenceOFMU(groups_for(m64, dict(HP0), dict(HP1)), **kw)
    s32, s64 = BatchStream(m32, dtype=torch.float32), BatchStream(m64)
    for _ in range(4):
        opt.step(s32)
        ref.step(s64)
    assert max_rel([p.double() for p in m32.parameters()], list(m64.parameters())) < 1e-4


def test_fd_matches_exact_to_truncation_error():
    """outer_hvp='fd' approximates the directional derivative: O(delta^2) away from exact
    when J_u is symmetric (similarity='none' gives J_u = H_f)."""
    base = mlp()
    out = {}
    for mode, delta in (("exact", 1e-3), ("fd", 1e-3), ("fd", 1e-4)):
        m = copy.deepcopy(base)
        opt = OFMU(m.parameters(), lr=0.5, inner_steps=0, rho=1.0, similarity="none",
                   outer_hvp=mode, fd_delta=delta)
        opt.step(BatchStream(m))
        out[(mode, delta)] = torch.cat([p.detach().flatten() for p in m.parameters()])
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    ex = out[("exact", 1e-3)] - start
    e3 = (out[("fd", 1e-3)] - start - ex).norm() / ex.norm()
    e4 = (out[("fd", 1e-4)] - start - ex).norm() / ex.norm()
    assert e3 < 1e-5
    assert e4 < e3 / 20  # central difference: error shrinks like delta^2
