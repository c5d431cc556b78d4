"""The reduction folded into the backward pass (ofmu.fused_reduce): against float64, bitwise
deterministic, and the same optimizer trajectory as the two-pass reduction to rounding."""

from __future__ import annotations

import pytest
import torch
from ofmu import OFMU
from ofmu import functional as F
from ofmu.fused_reduce import ENV, FusedReduce, setting, use_fused
from torch import nn

# TiedLM's unused parameter is deliberate (its share is computed after the pass)
pytestmark = pytest.mark.filterwarnings("ignore:1 parameter received no gradient")


class TiedLM(nn.Module):
    """Embedding -> one encoder layer -> mean pool -> output head tied to the embedding, plus an
    unused parameter (no gradient from either loss: its share is computed after the pass)."""

    def __init__(self, vocab=40, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(),
                         nn.Linear(17, 5))


def _data(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(24, 12, generator=g), torch.randint(0, 5, (24,), generator=g))
                for _ in range(4)]
    return [(torch.randint(0, 40, (6, 9), generator=g), torch.randint(0, 40, (6,), generator=g))
            for _ in range(4)]


def _setup(kind, seed=0):
    torch.manual_seed(seed)
    model = _mlp() if kind == "mlp" else TiedLM()
    return model, _data(kind, seed), _data(kind, seed + 100)


def _closure(model, forget, retain, counter):
    def closure():
        k = counter[0] % len(forget)
        counter[0] += 1
        ce = nn.functional.cross_entropy
        return ce(model(forget[k][0]), forget[k][1]), ce(model(retain[k][0]), retain[k][1])
    return closure


def _reference_stats(model, forget, retain, k, params):
    """float64 [<g_f, g_r>, |g_f|^2, |g_r|^2] from torch.autograd.grad (independent of the flat
    buffers and of the hooks)."""
    ce = nn.functional.cross_entropy
    gf = torch.autograd.grad(ce(model(forget[k][0]), forget[k][1]), params, allow_unused=True)
    gr = torch.autograd.grad(ce(model(retain[k][0]), retain[k][1]), params, allow_unused=True)
    f = torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()
                   for g, p in zip(gf, params)])
    r = torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()
                   for g, p in zip(gr, params)])
    return torch.stack([f @ r, f @ f, r @ r])


@pytest.mark.parametrize("kind", ["mlp", "tied"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_folded_stats_match_float64(kind, backend, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    model, forget, retain = _setup(kind)
    opt = OFMU(model.parameters(), lr=1e-2, backend=backend, preconditioner="sgd")
    params = list(opt._autodiff.params)
    ref = _reference_stats(model, forget, retain, 0, params)
    with torch.no_grad():
        ev = opt._autodiff.evaluate(_closure(model, forget, retain, [0]), fold=F.fold(opt._parts))
    assert ev.stats is not None and ev.stats[0] is not None  # the folded path ran
    got = ev.stats[0].double()
    scale = torch.sqrt(ref[1] * ref[2])  # |<g_f, g_r>| <= |g_f||g_r|
    torch.testing.assert_close(got[1:], ref[1:], rtol=1e-6, atol=0)
    assert abs(got[0] - ref[0]) <= 1e-6 * scale
    # the two-pass reduction of the same buffers agrees to rounding
    buf = opt._parts[0].buf
    two = opt._parts[0].backend.reduce3(buf.grad_f, buf.grad_r).double()
    torch.testing.assert_close(got[1:], two[1:], rtol=1e-6, atol=0)
    # the retain-only pass (outer step without the penalty): [0, |g_r|^2, 0]
    with torch.no_grad():
        ev = opt._autodiff.evaluate(_closure(model, forget, retain, [0]), forget=False,
                                    fold=F.fold(opt._parts))
    got = ev.stats[0].double()
    assert got[0] == 0 and got[2] == 0
    torch.testing.assert_close(got[1], ref[2], rtol=1e-6, atol=0)


def test_folded_stats_are_bitwise_deterministic(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    runs = []
    for _ in range(2):
        model, forget, retain = _setup("tied", seed=3)
        opt = OFMU(model.parameters(), lr=1e-2, preconditioner="sgd", inner_steps=2,
                   outer_steps=2)
        closure = _closure(model, forget, retain, [0])
        seen = []
        for _ in range(2):
            opt.step(closure)
            seen.append(opt._state.diag["inner_stats"].clone())
        runs.append(seen + [p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# Not Adam on the transformer: the key bias of attention has an exactly-zero gradient in exact
# arithmetic (softmax is shift-invariant), so its float gradient is rounding noise that Adam
# normalises into full-size steps; any change of summation order moves it by O(lr).
@pytest.mark.parametrize("kind,pre", [("mlp", "sgd"), ("mlp", "adam"), ("tied", "sgd")])
def test_optimizer_folded_equals_two_pass(kind, pre, monkeypatch):
    """Several steps (inner ascent, outer descent with the fd penalty: every plain-backward
    evaluation folded) give the two-pass trajectory to rounding."""
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(ENV, flag)
        model, forget, retain = _setup(kind, seed=1)
        # lr 3e-3: at 1e-2 the fd penalty (|v|/2delta times a rounding difference) makes the
        # trajectory chaotic: two-pass runs of the cpp and torch backends differ by O(1) too
        opt = OFMU(model.parameters(), lr=3e-3, inner_steps=2, outer_steps=2, rho=0.01,
                   outer_hvp="fd", preconditioner=pre, forget_loss_cap=None)
        closure = _closure(model, forget, retain, [0])
        for _ in range(4):
            opt.step(closure)
        out[flag] = (torch.cat([p.detach().flatten() for p in model.parameters()]),
                     opt.last_stats())
    (a, sa), (b, sb) = out["0"], out["1"]
    start = torch.cat([p.detach().flatten() for p in _setup(kind, seed=1)[0].parameters()])
    assert (a - start).abs().max() > 1e-3  # the steps moved theta: the comparison is not vacuous
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for key in ("inner_cosine", "cosine", "forget_grad_norm", "retain_grad_norm"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-7)


def test_graph_modes_and_off_do_not_fold(monkeypatch):
    model, forget, retain = _setup("mlp")
    opt = OFMU(model.parameters(), lr=1e-2, similarity="hvp", preconditioner="sgd")
    monkeypatch.setenv(ENV, "1")
    with torch.enable_grad():
        ev = opt._autodiff.evaluate(_closure(model, forget, retain, [0]), graph_f=True,
                                    graph_r=True, fold=F.fold(opt._parts))
    assert ev.stats is None  # autograd.grad: no accumulate hooks, the two-pass reduction runs
    monkeypatch.setenv(ENV, "0")
    assert F.fold(opt._parts) is None


def test_hook_overwrites_its_slot():
    """A parameter whose gradient arrives in several accumulations: each hook call recomputes
    the share from the views, so the last one holds the complete gradient's share."""
    x, y, p = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    st = FusedReduce()
    st.arm([F.reduce3], [[x]], [[y]], {id(p): (0, 0)})
    x += torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])
    y += 1.0
    st.hook(p)
    x += torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0])  # a second accumulation into the same view
    st.hook(p)
    (got,) = st.finish()
    torch.testing.assert_close(got, torch.tensor([6.0, 14.0, 5.0]))


def test_switch(monkeypatch):
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=ENV):
        setting()
    monkeypatch.delenv(ENV)
    assert setting() == "auto"
    monkeypatch.setattr("ofmu.fused_reduce.FUSED_MIN_MEAN_NUMEL", 1 << 16)
    assert use_fused("cpp", 1 << 22, 4, "auto") and not use_fused("cpp", 1 << 12, 4, "auto")
    monkeypatch.setattr("ofmu.fused_reduce.FUSED_MIN_MEAN_NUMEL", None)  # the shipped setting
    assert not use_fused("cpp", 1 << 30, 1, "auto") and use_fused("cpp", 64, 1, "on")
    assert not use_fused("triton", 1 << 22, 4, "auto") and use_fused("triton", 64, 1, "on")
    assert not use_fused("cpp", 1 << 22, 4, "off")



def test_fused_sweep_smoke(tmp_path):
    """The benchmark's sweep runs end to end (seconds) on a 2^12-parameter MLP."""
    from ofmu.bench import step

    rows = step.main(["--fused-sweep", "--device", "cpu", "--sweep-sizes", "12", "--models", "",
                      "--rounds", "1", "--repeats", "1", "--out", str(tmp_path)])
    (row,) = rows
    width = 32  # sqrt(2^12 / 4): four width x width layers and a 10-way head
    assert row["n_params"] == 4 * (width * width + width) + width * 10 + 10
    assert row["n_tensors"] == 10
    assert row["math_two_pass_us"] > 0 and row["inner_two_pass_ms"] > 0
    assert list(tmp_path.glob("fused_reduce*.csv"))
