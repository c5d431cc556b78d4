"""The one dispatch point: preference order, overrides, and errors that say why."""

import dataclasses

import ofmu
import pytest
import torch
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu import backend_info, backends


def test_cpu_prefers_the_cpp_extension_and_says_why():
    info = backend_info()
    assert info.available["torch"] == (True, "")
    name, reason = info.chosen["cpu"]
    assert name == ("cpp" if info.available["cpp"][0] else "torch")
    assert "first available for cpu" in reason
    if not torch.cuda.is_available():
        assert info.chosen["cuda"] == ("-", "no CUDA device visible")
        assert not info.available["cuda"][0] and info.available["cuda"][1]


def test_environment_override(monkeypatch):
    monkeypatch.setenv("OFMU_BACKEND", "torch")
    b, reason = backends.select("auto", torch.device("cpu"))
    assert b.name == "torch" and "OFMU_BACKEND" in reason
    opt = OFMU([torch.nn.Parameter(torch.zeros(3))])
    assert opt.backend_summary() == ["torch.float32 on cpu: torch (torch requested via "
                                     "OFMU_BACKEND)"]
    monkeypatch.setenv("OFMU_BACKEND", "vulkan")
    with pytest.raises(ValueError, match="unknown backend 'vulkan' \\(from OFMU_BACKEND\\)"):
        backends.select("auto", torch.device("cpu"))


def test_explicit_choice_beats_environment(monkeypatch):
    monkeypatch.setenv("OFMU_BACKEND", "cpp")
    b, reason = backends.select("torch", torch.device("cpu"))
    assert b.name == "torch" and "backend=" in reason


def test_impossible_choices_are_errors_not_fallbacks():
    with pytest.raises(ValueError, match="backend 'cuda' \\(from backend=\\) cannot run on cpu"):
        backends.select("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        b, why = backends.probe("cuda")
        assert b is None and why


def test_backends_share_the_contract_on_a_small_case():
    """Every available backend agrees with the float64 closed form on a 3-element case."""
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([4.0, -5.0, 6.0])
    for name, (ok, _) in backend_info().available.items():
        if not ok or (name in ("cuda",)):
            continue
        b = backends.probe(name)[0]
        assert b.reduce3(x, y).tolist() == [12.0, 14.0, 77.0], name
        theta = torch.ones(3)
        b.update(theta, x, y, torch.tensor([0.5, 1.0, 2.0, 1.0]))
        assert theta.tolist() == [9.5, -7.5, 15.5], name


@pytest.mark.parametrize("preconditioner,op", [("adam", "adam"), ("sign", "sign"), ("sgd", "update")])
def test_a_backend_record_passed_as_backend_runs_every_update(preconditioner, op):
    """backend= takes a Backend record; the preconditioned updates go through it too (the one
    place that chooses kernels): the selected backend's record passed as an object gives its
    result bit for bit, and a record whose update op leaves theta alone leaves every parameter
    where it was after a whole step (one inner and six outer updates: none goes around it)."""
    def run(backend):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        ce = torch.nn.functional.cross_entropy
        opt = ofmu.OFMU(m.parameters(), lr=1e-2, preconditioner=preconditioner, backend=backend)
        start = torch.cat([p.detach().flatten() for p in m.parameters()])
        opt.step(lambda: (ce(m(x[:4]), y[:4]), ce(m(x[4:]), y[4:])))
        return start, torch.cat([p.detach().flatten() for p in m.parameters()]), opt

    plain = backends.select("auto", torch.device("cpu"))[0]
    start, want, _ = run("auto")
    _, got, opt = run(dataclasses.replace(plain))
    assert "given as a Backend object" in opt.backend_summary()[0]
    assert torch.equal(got, want) and not torch.equal(want, start)
    _, held, _ = run(dataclasses.replace(plain, **{op: lambda *a, **k: None}))
    assert torch.equal(held, start)
