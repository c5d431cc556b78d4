"""The kernel benchmark's correctness gate (NOTE: [Correctness gate] in ofmu/bench/kernels.py).

It must be fair to every provider -- torch's own eager, foreach and compiled steps pass it at
every size -- and still fail a step with a wrong coefficient: beta dropped, or the projection
coefficient (or the learning rate) off by 1%. The reference is the float64 step; the gate's
tolerance comes from the error bound of the computation, not from another provider's error.
"""

from __future__ import annotations

import pytest
import torch
from ofmu import reference as R
from ofmu.bench import common as C
from ofmu.bench import kernels as K

CPU = torch.device("cpu")


def _gate(n: int, dtype: torch.dtype, fn) -> K.CheckResult:
    b = K.make_buffers(n, dtype, CPU)
    return K.check_error(b, fn)


def _provider(name: str):
    fn, why = K.make_provider(name, CPU)
    if fn is None:
        pytest.skip(why)
    return fn


WRONG = {
    "beta dropped": lambda b: K.eager_step(b.theta, b.gf, b.gr, beta=0.0),
    "projection +1%": lambda b: K.eager_step(b.theta, b.gf, b.gr, beta=K.BETA * 1.01),
    "projection -1% (fused)": lambda b: K.ofmu_step(R.reduce3, R.update, b.theta,
                                                     b.gf, b.gr, beta=K.BETA * 0.99),
    "lr +1%": lambda b: K.eager_step(b.theta, b.gf, b.gr, lr=K.LR * 1.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [2**12, 2**16, 2**18])
@pytest.mark.parametrize("name", ["eager", "foreach", "cpp", "reference"])
def test_correct_providers_pass(name, n, dtype):
    res = _gate(n, dtype, _provider(name))
    assert res.ok, res
    # The bound is not vacuous: the real error uses a visible part of it.
    assert res.elem_ratio > 0.02, res


@pytest.mark.parametrize("n", [2**12, 2**16, 2**18])
@pytest.mark.parametrize("wrong", WRONG)
def test_wrong_coefficient_fails_fp32(wrong, n):
    res = _gate(n, torch.float32, WRONG[wrong])
    assert not res.ok, res
    assert res.coef_ratio > 5 and res.elem_ratio > 5, res  # by a wide margin, not by luck
    if wrong != "beta dropped":  # the fit recovers the 1% error of c2
        assert abs(abs(res.coef_rel_err[2]) - 0.01) < 1e-3, res


@pytest.mark.parametrize("n", [2**12, 2**16])
def test_beta_dropped_fails_bf16(n):
    # In bf16 torch's own eager step computes its scalars (dot products, k) in bf16 and lands up
    # to ~0.7% off: a fair gate cannot fail a 1% error there, but it fails a dropped beta.
    res = _gate(n, torch.bfloat16, WRONG["beta dropped"])
    assert not res.ok and res.coef_ratio > 5, res
    assert res.coef_rel_err[2] == pytest.approx(1.0, abs=0.01)  # the fit says: c2 is all wrong


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_passes(dtype):
    fn = _provider("compile")
    for n in (2**12, 2**18):
        res = _gate(n, dtype, fn)
        assert res.ok, (n, res)


def test_coefficient_bound_follows_the_error_analysis():
    # fp32 at 2^16: the allowed error of c2 is LAMBDA*sqrt(n)*u*(sum|g_f g_r|/|d| + 1)*|c2| to
    # first order (k = d/|g_r|^2) plus COEF_ROUNDINGS*u*|c2|; recompute it by hand.
    b = K.make_buffers(2**16, torch.float32, CPU)
    ref = K.reference(b)
    f, r = b.gf.double(), b.gr.double()
    d, nr2 = float(f @ r), float(r @ r)
    u = 2.0**-24
    gamma = K.LAMBDA * 2**8 * u
    rel = (gamma * float((f * r).abs().sum()) + u * abs(d)) / abs(d) + (gamma + u) * nr2 / nr2
    want = (rel + K.COEF_ROUNDINGS * u) * abs(float(ref.coeffs[2]))
    assert float(ref.coef_bound[2]) == pytest.approx(want, rel=1e-3)
    assert float(ref.coef_bound[0]) == pytest.approx(K.COEF_ROUNDINGS * u * 1.0, rel=1e-6)


@pytest.mark.parametrize("text,want", [
    ("fp32", [torch.float32]),
    ("float32,bfloat16", [torch.float32, torch.bfloat16]),
    ("torch.float16, bf16", [torch.float16, torch.bfloat16]),
    ("fp32,float32", [torch.float32]),
])
def test_dtype_aliases(text, want):
    assert C.parse_dtypes(text) == want


def test_unknown_dtype_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match=r"unknown dtype 'float8' in --dtypes; use any of fp32, float32"):
        C.parse_dtypes("fp32,float8")
    # From the command line: an argparse error (usage + message on stderr, status 2), before
    # anything runs.
    with pytest.raises(SystemExit) as e:
        K.main(["--device", "cpu", "--dtypes", "int8", "--sizes", "4096", "--no-plot"])
    assert e.value.code == 2
    assert "unknown dtype 'int8' in --dtypes" in capsys.readouterr().err
