"""Misuse that used to do nothing (or the wrong thing) silently: each case raises naming the
culprit, is counted, or is handled (docs/guarantees.md lists them)."""


import gc
import io
import os
import socket
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from ofmu import OFMU

mse = torch.nn.functional.mse_loss
# explicit settings: these tests count updates and compute steps by hand
PLAIN = dict(preconditioner="sgd", inner_steps=1, outer_steps=1, rho=0.0, forget_loss_cap=None)


def ofmu(params, **kw):
    return OFMU(params, **{**PLAIN, **kw})


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def closure_for(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    xf, xr = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    yf, yr = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    return lambda: (mse(model(xf), yf), mse(model(xr), yr))


# ------------------------------------------------------------------------- 3. duplicates


def test_same_parameter_twice_in_a_group_is_named():
    lin = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match=r"params\[2\] \(shape \(2, 3\)\) is the same tensor as "
                                            r"param_groups\[0\]\.params\[0\]"):
        ofmu([lin.weight, lin.bias, lin.weight])


def test_tied_weights_listed_twice_are_named():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(params) == 2 and params[0] is params[1]
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match=r"params\[1\].*same tensor as.*params\[0\].*tied"):
        ofmu(params)
    # listed once (the default of named_parameters), the tied weight trains as one tensor
    opt = ofmu(model.parameters(), lr=0.5, inner_steps=0, rho=0.0)
    idx = torch.tensor([0, 3])
    before = emb.weight.detach().clone()

    def loss():
        return head(emb(idx)).pow(2).sum()

    w = before.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((w[idx] @ w.T).pow(2).sum(), w)  # both uses, by hand
    opt.step(lambda: (loss(), loss()))
    assert torch.allclose(emb.weight.detach(), before - 0.5 * g, atol=1e-6)
    assert head.weight is emb.weight


# ------------------------------------------------------------------------ 5. concurrency


@pytest.mark.parametrize("entry", ["step", "inner_step", "outer_step"])
def test_a_second_thread_cannot_enter_a_running_step(entry):
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1, inner_steps=1)
    ref_model = mlp()
    ref = ofmu(ref_model.parameters(), lr=0.1, inner_steps=1)
    inside, release = threading.Event(), threading.Event()
    base = closure_for(model)

    def blocking_closure():
        inside.set()
        assert release.wait(30)
        return base()

    errors = []
    worker = threading.Thread(target=lambda: getattr(opt, entry)(blocking_closure))
    worker.start()
    try:
        assert inside.wait(30)
        for name in ("step", "inner_step", "outer_step"):
            try:
                getattr(opt, name)(base)
            except RuntimeError as e:
                errors.append(str(e))
    finally:
        release.set()
        worker.join()
    assert len(errors) == 3 and all("another step of this optimizer is running" in e for e in errors)
    # the refused calls changed nothing: the result is the single call's, bit for bit
    getattr(ref, entry)(closure_for(ref_model))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    opt.step(base)  # the guard is released afterwards


def test_closure_calling_step_is_refused():
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1, inner_steps=1)
    base = closure_for(model)

    def reentrant():
        opt.step(base)
        return base()

    with pytest.raises(RuntimeError, match=r"OFMU.step\(\) called while another step"):
        opt.step(reentrant)


# --------------------------------------------------------------- 1c. requires_grad changed


def test_parameter_frozen_after_construction_is_named():
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1, inner_steps=1)
    model[2].bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\.params\[3\] \(shape \(2,\)\) was "
                                           r"switched to requires_grad=False.*rebuild the optimizer"):
        opt.step(closure_for(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing moved


def test_parameter_unfrozen_after_construction_is_named():
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = ofmu(model.parameters(), lr=0.1, inner_steps=1)
    opt.step(closure_for(model))  # frozen at construction: left out, fine
    model[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\.params\[0\] \(shape \(6, 4\)\) was "
                                           r"frozen.*now requires grad.*rebuild the optimizer"):
        opt.step(closure_for(model))
    model[0].weight.requires_grad_(False)  # frozen again: steps resume
    w = model[0].weight.detach().clone()
    opt.step(closure_for(model))
    assert torch.equal(model[0].weight, w)


# ------------------------------------------------------------- 4. non-finite inputs


@pytest.mark.parametrize("preconditioner", ["adam", "sgd"])
def test_inf_parameter_with_weight_decay_skips_and_is_counted(preconditioner):
    """An Inf in a row no loss reads: gradients finite, but the weight-decay term is not."""
    emb = torch.nn.Embedding(5, 3)
    with torch.no_grad():
        emb.weight[4] = float("inf")
    opt = ofmu(emb.parameters(), lr=0.1, inner_steps=1, weight_decay=0.01,
               preconditioner=preconditioner)
    idx = torch.tensor([0, 1, 2])
    before = emb.weight.detach().clone()
    opt.step(lambda: (emb(idx).pow(2).sum(), (emb(idx) - 1).pow(2).sum()))
    stats = opt.last_stats()
    assert stats["skipped_steps"] == 2  # the inner and the outer update
    assert torch.equal(emb.weight.detach(), before)  # Inf stays Inf, no NaN, nothing moved
    for st in opt.state.values():
        for key, t in st.items():
            assert torch.count_nonzero(t) == 0, key  # moments and step counts untouched
    # without weight decay the Inf row is only carried: the finite rows take the normal step
    emb2 = torch.nn.Embedding(5, 3)
    with torch.no_grad():
        emb2.weight.copy_(before)
    opt2 = ofmu(emb2.parameters(), lr=0.1, inner_steps=1, preconditioner=preconditioner)
    opt2.step(lambda: (emb2(idx).pow(2).sum(), (emb2(idx) - 1).pow(2).sum()))
    assert opt2.last_stats()["skipped_steps"] == 0
    assert torch.isinf(emb2.weight[4]).all() and torch.isfinite(emb2.weight[:4]).all()
    assert not torch.equal(emb2.weight[:3].detach(), before[:3])


@pytest.mark.parametrize("which", ["forget", "retain"])
def test_infinite_loss_with_finite_gradients_is_skipped_and_counted(which):
    """loss + inf: the gradient is finite, the loss is not; the step that used it is skipped."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = ofmu([p], lr=0.1, inner_steps=1, rho=0.0)
    inf = torch.tensor(float("inf"))

    def closure():
        lf, lr = (p * p).sum(), (p - 1).pow(2).sum()
        return (lf + inf, lr) if which == "forget" else (lf, lr + inf)

    opt.step(closure)
    # forget: only the inner update used it (rho=0: the outer step backpropagates the retain
    # loss alone); retain: both updates used it
    assert opt.last_stats()["skipped_steps"] == (1 if which == "forget" else 2)
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    if which == "forget":  # the outer step alone ran: theta - lr * 2 (theta - 1), by hand
        expected = expected - 0.1 * 2.0 * (expected - 1.0)
    assert torch.allclose(p.detach().double(), expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------- 2. storage sharing


def test_parameters_over_one_storage_are_refused_naming_both():
    base = torch.nn.Parameter(torch.randn(3, 4))
    row = torch.nn.Parameter(base.data[1])  # shares base's memory
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(3, 4\)\) and param_groups\[0\]"
                                         r"\.params\[1\] \(shape \(4,\)\) share memory"):
        ofmu([base, row])
    # in separate groups too (the first group sees row as an outside view of base: a warning)
    shared = r"params\[0\] \(shape \(3, 4\)\) and param_groups\[1\]\.params\[0\] \(shape \(4,\)\) share"
    with pytest.warns(UserWarning, match="shares its storage"), pytest.raises(ValueError, match=shared):
        ofmu([{"params": [base]}, {"params": [row], "lr": 0.5}])


def test_shared_memory_parameters_are_refused_and_sharing_later_keeps_working():
    model = mlp()
    model.share_memory()
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(6, 4\)\) is in shared memory"):
        ofmu(model.parameters())
    # share_memory() after construction moves the whole flat buffer into shared memory: the
    # parameters still view it, and the step is the one without sharing, bit for bit
    a, b = mlp(), mlp()
    opt_a, opt_b = ofmu(a.parameters(), lr=0.1), ofmu(b.parameters(), lr=0.1)
    a.share_memory()
    assert all(p.is_shared() for p in a.parameters())
    opt_a.step(closure_for(a))
    opt_b.step(closure_for(b))
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.is_shared() and torch.equal(p, q)
    assert not torch.equal(a[0].weight, mlp()[0].weight)  # it did move


def test_a_kept_view_of_a_weight_is_warned_about():
    model = mlp()
    kept = model[2].weight.data[0]  # the user's view of a weight
    old = kept.clone()
    with pytest.warns(UserWarning, match=r"params\[2\] \(shape \(2, 6\)\) shares its storage "
                                         r"with other tensors"):
        opt = ofmu(model.parameters(), lr=0.1)
    opt.step(closure_for(model))
    assert not torch.equal(model[2].weight[0], old)  # the parameter moved ...
    assert torch.equal(kept, old)  # ... the stale view did not: what the warning says
    del kept


def test_no_sharing_warning_for_a_plain_model_or_a_rebuilt_optimizer(recwarn):
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1)
    opt.step(closure_for(model))
    opt2 = ofmu(model.parameters(), lr=0.1)  # parameters already view the first flat buffer
    opt2.step(closure_for(model))
    del opt
    opt3 = ofmu(model.parameters(), lr=0.1)
    opt3.step(closure_for(model))
    assert [str(w.message) for w in recwarn] == []


def test_saving_one_parameter_documented_workaround():
    """docs/guarantees.md: a parameter views its group's flat buffer, so torch.save(p) writes
    the whole buffer; torch.save(p.detach().clone()) writes only p."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    bias = model[1].bias
    ofmu(model.parameters(), lr=0.1)

    def saved_bytes(obj):
        f = io.BytesIO()
        torch.save(obj, f)
        return len(f.getvalue()), f

    n_fresh, _ = saved_bytes(torch.zeros(32))  # an independent 32-element tensor
    n_naive, _ = saved_bytes(bias)
    n_clone, f = saved_bytes(bias.detach().clone())
    trainable_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert n_naive >= trainable_bytes  # every trainable weight is in the file
    assert n_clone <= n_fresh + 256  # only the bias
    f.seek(0)
    assert torch.equal(torch.load(f), bias.detach())


# ------------------------------------------- 1a, 1b. losses that reach no optimised parameter


def test_load_state_dict_assign_after_construction_is_named():
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1)
    sd = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)  # new Parameter objects: the optimizer's are orphaned
    with pytest.raises(RuntimeError, match=r"no gradient reached any of the optimizer's parameters "
                                           r"\(first: param_groups\[0\]\.params\[0\] \(shape \(6, 4\)\)"
                                           r".*load_state_dict\(assign=True\)"):
        opt.step(closure_for(model))
    assert torch.equal(model[0].weight, sd["0.weight"])  # nothing moved


def test_swapping_load_with_assign_after_construction_is_named():
    """Under torch's swap-on-conversion flag the Parameter objects stay and their storage is
    swapped: the per-step aliasing check names the parameter."""
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1)
    sd = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    weight = model[0].weight
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(sd, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model[0].weight is weight
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\.params\[0\] \(shape \(6, 4\)\) no longer "
                                           r"lives in the optimizer's flat buffer"):
        opt.step(closure_for(model))
    assert torch.equal(model[0].weight, sd["0.weight"])


@pytest.mark.parametrize("which", ["forget_loss", "retain_loss"])
@pytest.mark.parametrize("similarity", ["project", "hvp"])
def test_a_loss_that_reaches_no_parameter_is_named(which, similarity):
    model, other = mlp(), mlp(seed=5)
    opt = ofmu(model.parameters(), lr=0.1, similarity=similarity)
    good, bad = closure_for(model), closure_for(other)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        (lf, lr), (of, orr) = good(), bad()
        return (of, lr) if which == "forget_loss" else (lf, orr)

    with pytest.raises(RuntimeError, match=rf"{which} returned by the closure does not depend on "
                                           r"any parameter this optimizer updates"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.last_stats()["skipped_steps"] == 0



@pytest.mark.parametrize("similarity", ["project", "hvp"])
def test_a_replaced_submodule_is_warned_about_by_name(similarity):
    """Part of the model re-created after construction: its new parameters train nothing the
    optimizer sees, the old ones get no gradient from either loss; warned once, by name."""
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1, similarity=similarity)
    old_head = model[2]
    model[2] = torch.nn.Linear(6, 2)
    with pytest.warns(UserWarning, match=r"2 parameters received no gradient from either loss: "
                                         r"param_groups\[0\]\.params\[2\] \(shape \(2, 6\)\), "
                                         r"param_groups\[0\]\.params\[3\] \(shape \(2,\)\)"):
        opt.step(closure_for(model))
    w = old_head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per set of parameters
        opt.step(closure_for(model))
    assert torch.equal(old_head.weight, w)  # no gradient, no weight decay: unchanged



def test_a_submodule_replaced_between_steps_is_warned_about_at_that_step():
    """After steps that reached every parameter the reach is counted per buffer (no names);
    the step after the head is re-created still warns at once, naming its old parameters
    (found from the backward pass's graph), and the run goes on warning no more."""
    model = mlp()
    opt = ofmu(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(closure_for(model))
    old_head = model[2]
    model[2] = torch.nn.Linear(6, 2)
    with pytest.warns(UserWarning, match=r"2 parameters received no gradient from either loss: "
                                         r"param_groups\[0\]\.params\[2\] \(shape \(2, 6\)\), "
                                         r"param_groups\[0\]\.params\[3\] \(shape \(2,\)\)"):
        opt.inner_step(closure_for(model))
    w = old_head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per set of parameters
        opt.step(closure_for(model))
    assert torch.equal(old_head.weight, w)


def test_a_backward_function_writing_into_its_incoming_gradient_leaves_later_passes_alone():
    """The backward passes start from one kept ones tensor; a loss whose backward writes into
    its incoming gradient in place (autograd allows it) gets a new one next time, so both
    gradient buffers hold what autograd gives from a fresh seed, step after step."""
    class Doubled(torch.autograd.Function):  # identity forward; backward doubles in place
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g.mul_(2)

    model = mlp()
    opt = ofmu(model.parameters(), lr=0.0)  # the weights stay: every pass sees the same model
    g = torch.Generator().manual_seed(1)
    xf, xr = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    yf, yr = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)

    def losses():
        return Doubled.apply(mse(model(xf), yf)), Doubled.apply(mse(model(xr), yr))

    params = list(model.parameters())
    ref_f, ref_r = (torch.cat([g.flatten() for g in torch.autograd.grad(2 * loss, params)])
                    for loss in (mse(model(xf), yf), mse(model(xr), yr)))
    buf = opt.flat_buffers[0]
    for _ in range(3):
        opt.inner_step(losses)
        got_f, got_r = (torch.cat([v.flatten() for v in buf.views(flat)])
                        for flat in (buf.grad_f, buf.grad_r))
        assert torch.equal(got_f, ref_f) and torch.equal(got_r, ref_r)


def test_the_older_of_two_optimizers_over_one_model_raises_at_its_next_step():
    model = mlp()
    old, new = ofmu(model.parameters(), lr=0.1), ofmu(model.parameters(), lr=0.1)
    new.step(closure_for(model))
    after = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"params\[0\] \(shape \(6, 4\)\) no longer lives in "
                                           r"the optimizer's flat buffer"):
        old.step(closure_for(model))
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))


# ---------------------------------------------------------------------------- hook leaks


def hook_counts(model):
    return [(len(p._backward_hooks or {}), len(p._post_accumulate_grad_hooks or {}))
            for p in model.parameters()]


def test_dropped_optimizers_leave_no_hooks_on_the_parameters():
    model = mlp()
    assert hook_counts(model) == [(0, 0)] * 4
    live = ofmu(model.parameters(), lr=0.1)
    assert hook_counts(model) == [(1, 0)] * 4  # the sparse-gradient checks, until a backward
    live.step(closure_for(model))
    assert hook_counts(model) == [(0, 0)] * 4  # reach is read from version counters: no hooks
    for i in range(100):  # dropped without a step, and dropped after one
        opt = ofmu(model.parameters(), lr=0.1)
        if i % 2:
            opt.step(closure_for(model))
    del opt, live
    gc.collect()
    assert hook_counts(model) == [(0, 0)] * 4


# ------------------------------------------- 4 (FSDP2). an Inf in one rank's shard only


def _inf_shard_rank(rank, world, out, port):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 2))
        with torch.no_grad():
            model[0].weight[0] = float("inf")  # rank 0's shard (rows 0-3); no loss reads row 0
        fully_shard(model)
        opt = ofmu(model.parameters(), lr=0.1, weight_decay=0.01)
        before = [p.detach().to_local().clone() for p in model.parameters()]
        idx_f, idx_r = torch.tensor([4, 5]), torch.tensor([6, 7])
        opt.step(lambda: (model(idx_f).pow(2).mean(), (model(idx_r) - 1).pow(2).mean()))
        after = [p.detach().to_local() for p in model.parameters()]
        result = {"skipped": opt.last_stats()["skipped_steps"],
                  "unchanged": all(torch.equal(a, b) for a, b in zip(after, before))}
        # requires_grad switched off after construction, on a sharded parameter
        torch.manual_seed(0)
        model = fully_shard(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 2)))
        opt = ofmu(model.parameters(), lr=0.1)
        model[1].bias.requires_grad_(False)
        try:
            opt.step(lambda: (model(idx_f).pow(2).mean(), (model(idx_r) - 1).pow(2).mean()))
            result["frozen_error"] = None
        except RuntimeError as e:
            result["frozen_error"] = str(e)
        # the same sharded parameter twice
        try:
            ofmu([model[1].weight, model[0].weight, model[1].weight])
            result["duplicate_error"] = None
        except ValueError as e:
            result["duplicate_error"] = str(e)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_inf_in_one_shard_frozen_and_duplicate_parameters(tmp_path):
    """FSDP2: each rank sees its own shard; the weight-decay finite check must agree across
    ranks, or one rank skips while the other updates its shard. requires_grad switched off on a
    sharded parameter, and a sharded parameter listed twice, are named as plain ones are."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, __file__, str(tmp_path), str(port)], check=True, timeout=300,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["skipped"] for r in ranks] == [2, 2]  # the inner and the outer update, both ranks
    assert all(r["unchanged"] for r in ranks)
    for r in ranks:
        assert r["frozen_error"] is not None and r["frozen_error"].startswith(
            "parameter param_groups[0].params[2] (shape (2,)) was switched to requires_grad=False")
        assert r["duplicate_error"] is not None and r["duplicate_error"].startswith(
            "parameter param_groups[0].params[2] (shape (2, 4)) is the same tensor as "
            "param_groups[0].params[0] (shape (2, 4))")


if __name__ == "__main__":  # the ranks of the FSDP2 test above (gloo, forked)
    import torch._dynamo  # noqa: F401  (imported once, before the fork: ~5 s per process)
    import torch.distributed.fsdp  # noqa: F401
    import torch.multiprocessing as mp

    mp.start_processes(_inf_shard_rank, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2,
                       start_method="fork")
