"""A step that raises, or a call that is refused, changes nothing it did not finish
(docs/guarantees.md, "When a step raises"): the fd probes put the weights back bit for bit,
a closure that fails at any of a step's calls leaves the state of the last completed update,
a model without a double backward is refused before the first update, a refused
``load_state_dict`` or a setting edited into something invalid changes nothing."""

import copy

import pytest
import torch
from ofmu import OFMU
from ofmu.backends import probe
from ofmu.gradients import NoDoubleBackwardError

mse = torch.nn.functional.mse_loss
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ["torch"] + (["cpp"] if probe("cpp")[0] is not None else [])


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 2)).to(dtype)


class Boom(Exception):
    pass


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises: a failure inside the optimizer's backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise Boom("backward")


class Stream:
    """A closure over numbered minibatches (call ``i`` always draws batch ``i``) that raises on
    call ``fail_at``: in the closure itself, or in the backward pass of its retain loss."""

    def __init__(self, model, fail_at=None, where="closure"):
        self.model, self.calls, self.fail_at, self.where = model, 0, fail_at, where

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(1000 + self.calls)
        dt = next(self.model.parameters()).dtype
        xf, xr = (torch.randn(8, 4, generator=g).to(dt) for _ in range(2))
        yf, yr = (torch.randn(8, 2, generator=g).to(dt) for _ in range(2))
        failing = self.calls == self.fail_at
        if failing and self.where == "closure":
            raise Boom(f"call {self.calls}")
        lf, lr = mse(self.model(xf), yf), mse(self.model(xr), yr)
        return lf, (_FailingBackward.apply(lr) if failing else lr)


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def assert_same(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    _same_tree(sa, sb)


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_tree(x, y)
    else:
        assert a == b


# ----------------------------------------------------------- 1. fd probes restore exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fd_probes_put_the_weights_back_bit_for_bit(dtype, backend):
    """With lr = 0 nothing may move: 20 default steps with the penalty on (outer_hvp='fd',
    2 probes per outer step) leave every weight bit-identical, in every dtype."""
    m = mlp(DTYPES[dtype])
    before = [p.detach().clone() for p in m.parameters()]
    opt = OFMU(m.parameters(), lr=0.0, rho=0.1, backend=backend)
    s = Stream(m)
    for _ in range(20):
        opt.step(s)
    stats = opt.last_stats()
    assert stats["grad_phi_sq"] > 0 and stats["skipped_steps"] == 0  # the probes moved
    assert s.calls == 20 * (1 + 6 * 3)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach().view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------- 2. a failure at any closure call of a step

CONFIGS = {
    "defaults": dict(lr=0.01),
    "paper": dict(lr=0.01, **OFMU.paper_config()),
    "fd-rho": dict(lr=0.01, rho=0.1),
    "fd-rho-sgd-clip": dict(lr=0.01, rho=0.1, preconditioner="sgd", max_grad_norm=0.05,
                            inner_preconditioner="sign", rho_growth=2.0),
}


def _sub_updates(kw):
    """Calls of the closure after each of one step's updates (inner, then outer), from the
    public one-update methods."""
    m = mlp()
    opt = OFMU(m.parameters(), **kw)
    s = Stream(m)
    ends = []
    for _ in range(opt.inner_steps):
        opt.inner_step(s)
        ends.append(("inner", s.calls))
    for _ in range(opt.outer_steps):
        opt.outer_step(s)
        ends.append(("outer", s.calls))
    return ends


def _cases():
    for name, kw in CONFIGS.items():
        n = _sub_updates(kw)[-1][1]
        for k in range(1, n + 1):
            yield name, k


@pytest.mark.parametrize("where", ["closure", "backward"])
@pytest.mark.parametrize("name,k", list(_cases()))
def test_a_step_failing_at_any_closure_call_keeps_only_completed_updates(name, k, where):
    """One good step, then a step whose ``k``-th closure call raises: the parameters, Adam
    moments and step counts, counters and the rho schedule are those of a run that took the
    updates completed before that call (and nothing of the failed one: no probe
    displacement). Both runs then take the same next step alike."""
    kw = CONFIGS[name]
    ends = _sub_updates(kw)
    n = ends[-1][1]

    m = mlp()
    opt = OFMU(m.parameters(), **kw)
    s = Stream(m)
    opt.step(s)
    s.fail_at, s.where = n + k, where
    with pytest.raises(Boom):
        opt.step(s)

    ref = mlp()
    ref_opt = OFMU(ref.parameters(), **kw)
    rs = Stream(ref)
    ref_opt.step(rs)
    for kind, end in ends:
        if end >= k:
            break
        (ref_opt.inner_step if kind == "inner" else ref_opt.outer_step)(rs)
    assert_same(snapshot(m, opt), snapshot(ref, ref_opt))

    s.fail_at, s.calls, rs.calls = None, 500, 500  # the same batches from here on
    opt.step(s)
    ref_opt.step(rs)
    assert_same(snapshot(m, opt), snapshot(ref, ref_opt))


# ------------------------------------- 3. no double backward: refused before any update


class SdpaNet(torch.nn.Module):
    """One attention layer through ``scaled_dot_product_attention`` (fused on CPU: its backward
    has no derivative of its own, like the default attention of transformers models)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, t, 8)).mean(1)


def sdpa_closure(model):
    g = torch.Generator().manual_seed(0)
    xf, xr = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    yf, yr = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    return lambda: (mse(model(xf), yf), mse(model(xr), yr))


DOUBLE = {
    "paper": OFMU.paper_config(),
    "forget-adam": dict(rho=0.1, outer_hvp="forget", inner_steps=3),
    "exact-sign": dict(rho=0.1, outer_hvp="exact", inner_preconditioner="sign"),
}


@pytest.mark.parametrize("name", list(DOUBLE))
def test_a_model_without_double_backward_is_refused_before_the_first_update(name):
    """The inner steps are first order, the outer one is not: the error comes at the first
    closure call of the first step, and the model and the optimizer state are untouched
    (at the second try too)."""
    m = SdpaNet()
    opt = OFMU(m.parameters(), lr=0.1, **DOUBLE[name])
    fresh = snapshot(m, opt)
    for _ in range(2):
        with pytest.raises(NoDoubleBackwardError, match="scaled_dot_product_attention"):
            opt.step(sdpa_closure(m))
        assert_same(snapshot(m, opt), fresh)


def test_a_transformers_model_with_default_attention_is_refused_before_the_first_update():
    transformers = pytest.importorskip("transformers")
    from _hf_common import config, sequences

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("llama"))
    forget, retain = sequences()
    opt = OFMU(model.parameters(), lr=0.01, **OFMU.paper_config())
    fresh = snapshot(model, opt)

    def closure():
        return (model(input_ids=forget, labels=forget).loss,
                model(input_ids=retain, labels=retain).loss)

    with pytest.raises(NoDoubleBackwardError, match="attn_implementation='eager'"):
        opt.step(closure)
    assert_same(snapshot(model, opt), fresh)


# ---------------------------------------------- 4. a refused load_state_dict changes nothing


def _trained(kw, seed=0, width=6):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))
    opt = OFMU(m.parameters(), **kw)
    s = Stream(m)
    for _ in range(2):
        opt.step(s)
    return m, opt


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes():
    m, opt = _trained(dict(lr=0.01))
    _, other = _trained(dict(lr=0.5, rho=0.3), seed=1, width=5)  # same count, other shapes
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match="different model"):
        opt.load_state_dict(other.state_dict())
    assert_same(snapshot(m, opt), before)
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("edit", ["lr", "state_key", "counter"])
def test_an_invalid_checkpoint_is_refused_before_anything_changes(edit):
    m, opt = _trained(dict(lr=0.01))
    _, donor = _trained(dict(lr=0.02, rho=0.2), seed=3)
    sd = copy.deepcopy(donor.state_dict())
    if edit == "lr":
        sd["param_groups"][0]["lr"] = -1.0
    elif edit == "state_key":
        sd["state"][3]["momentum_buffer"] = torch.zeros(2)
    else:
        sd["ofmu"]["skipped_steps"] = "three"
    before = snapshot(m, opt)
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(sd)
    assert_same(snapshot(m, opt), before)


def test_an_adam_checkpoint_into_a_sign_inner_loop_names_the_setting():
    _, adam = _trained(dict(lr=0.01))
    m, opt = _trained(dict(lr=0.01, inner_preconditioner="sign"))
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match="inner_exp_avg.*inner_preconditioner"):
        opt.load_state_dict(adam.state_dict())
    assert_same(snapshot(m, opt), before)


def test_a_valid_checkpoint_still_loads_everything():
    m, opt = _trained(dict(lr=0.01, rho=0.1))
    m2, opt2 = _trained(dict(lr=0.01, rho=0.1), seed=5)
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert_same(snapshot(m2, opt2), snapshot(m, opt))


# ------------------------------------------------- 5. settings edited after construction


@pytest.mark.parametrize("key,value,kw", [
    ("preconditioner", "adam", dict(preconditioner="sgd")),
    ("preconditioner", "sgd", {}),
    ("inner_preconditioner", None, dict(inner_preconditioner="sign")),
    ("inner_preconditioner", "sign", {}),
    ("backend", "torch", dict(backend="auto")),
])
def test_a_setting_fixed_at_construction_edited_later_is_named(key, value, kw):
    m, opt = _trained(dict(lr=0.01, **kw))
    setattr(opt, key, value)
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match=f"OFMU.{key} was .* fixed at construction.*Set it back"):
        opt.step(Stream(m))
    assert_same(snapshot(m, opt), before)


@pytest.mark.parametrize("key,value", [("outer_steps", 0), ("inner_steps", -1),
                                       ("similarity", "cosine"), ("outer_hvp", None),
                                       ("fd_delta", 0.0), ("eps", float("nan")),
                                       ("forget_loss_cap", -1.0), ("inner_steps", 1.5),
                                       ("inner_steps", True)])  # == 1, validated before
def test_an_invalid_setting_edited_later_is_named_before_any_update(key, value):
    m, opt = _trained(dict(lr=0.01, rho=0.1))
    setattr(opt, key, value)
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match="changed after construction"):
        opt.step(Stream(m))
    assert_same(snapshot(m, opt), before)


@pytest.mark.parametrize("edit", ["equal value of another type", "list edited in place"])
def test_a_param_group_value_edited_after_steps_is_validated_again(edit):
    """An update validates a group again unless every value is the very object validated last
    time: False where weight_decay was 0 (equal, but not a number the optimizer takes) and a
    betas list edited in place (the same object, new contents) are both refused."""
    m, opt = _trained(dict(lr=0.01, weight_decay=0))
    g = opt.param_groups[0]
    if edit == "list edited in place":
        g["betas"] = [0.9, 0.999]
        opt.step(Stream(m))
        g["betas"][0] = 1.5
        err, match = ValueError, "betas must be two numbers in"
    else:
        g["weight_decay"] = False
        err, match = TypeError, "weight_decay must be a number, got bool"
    before = snapshot(m, opt)
    with pytest.raises(err, match=match):
        opt.step(Stream(m))
    assert_same(snapshot(m, opt), before)


def test_a_per_optimizer_setting_in_a_param_group_is_named():
    m, opt = _trained(dict(lr=0.01, preconditioner="sgd"))
    opt.param_groups[0]["preconditioner"] = "adam"
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has 'preconditioner'"):
        opt.step(Stream(m))
    assert_same(snapshot(m, opt), before)


def test_a_mode_edited_later_takes_effect():
    """Valid edits of the modes are honoured, not silently ignored: the step equals that of an
    optimizer built with the new mode."""
    a, b = mlp(), mlp()
    oa = OFMU(a.parameters(), lr=0.01, rho=0.1, preconditioner="sgd")
    ob = OFMU(b.parameters(), lr=0.01, rho=0.1, preconditioner="sgd", outer_hvp="none",
              similarity="none")
    oa.outer_hvp, oa.similarity = "none", "none"
    sa, sb = Stream(a), Stream(b)
    oa.step(sa)
    ob.step(sb)
    assert sa.calls == sb.calls == 7
    assert_same(snapshot(a, oa), snapshot(b, ob))


# ------------------------------------------- 6. parameters the flat layout cannot serve


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_complex_parameters_are_refused_at_construction(backend):
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"params\[1\].*complex"):
        OFMU([torch.nn.Parameter(torch.randn(2)), w], backend=backend)


@pytest.mark.parametrize("relayout", ["transpose", "reshape", "dtype"])
def test_a_parameter_given_a_new_layout_over_its_slot_is_named(relayout):
    """``w.data = w.data.view(4, 8).t()`` keeps the address and the shape: the strides tell."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 8).to(torch.bfloat16 if relayout == "dtype" else torch.float32)
    opt = OFMU(lin.parameters(), lr=0.1, preconditioner="sgd")
    w = lin.weight
    if relayout == "transpose":
        w.data = w.data.view(4, 8).t()
    elif relayout == "reshape":
        w.data = w.data.view(32)
    else:
        w.data = w.data.view(torch.float16)  # same size, shape and strides
    before = opt.flat_buffers[0].param.clone()
    x = torch.randn(5, 4, dtype=lin.bias.dtype)
    with pytest.raises(RuntimeError, match=r"params\[0\].*layout"):
        opt.step(lambda: (lin(x).pow(2).mean(), (lin(x) - 1).pow(2).mean()))
    assert torch.equal(opt.flat_buffers[0].param.view(torch.uint8), before.view(torch.uint8))
