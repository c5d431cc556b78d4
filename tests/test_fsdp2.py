"""OFMU on FSDP2-sharded models (gloo, CPU processes): every rank updates its own shard, and
the result equals the single-process run on the union of the minibatches; misuse fails clearly.

One worker process runs three jobs of forked gloo ranks (tests/_fsdp2_worker.py: every config,
the misuse cases, checkpoints, measurements); the single-process reference runs here, on plain
parameters and whole batches.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from _fsdp2_worker import (
    CKPT,
    CKPT_STEPS,
    COMMON,
    CONFIGS,
    CONFIGS4,
    GRADS_CONFIG,
    LM,
    MP_CONFIGS,
    SWITCHED,
    Slices,
    build,
    grads_after,
    mlp,
    run_single,
)
from ofmu import OFMU

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Three jobs from one worker process (each job: new forked ranks, a new process group):
    2 ranks (configs, misuse, checkpoint save, mixed precision, measurements); 2 ranks that
    restart from the checkpoint; 4 ranks (configs, HSDP, the 2-rank checkpoint resharded)."""
    out = tmp_path_factory.mktemp("fsdp2")
    worker = os.path.join(os.path.dirname(__file__), "_fsdp2_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stages = [(2, "configs,misuse,save,mp,measure,grads,switched"), (2, "load,load_model_only"),
              (4, "configs4,load,hsdp"), (2, "example")]
    subprocess.run([sys.executable, worker, str(out), *[str(x) for st in stages for x in st]],
                   check=True, timeout=300, env=env)
    return [[torch.load(out / f"job{i}" / f"rank{r}.pt") for r in range(world)]
            for i, (world, _) in enumerate(stages[:-1])] + [out / "ckpt", out / "job3"]


@pytest.fixture(scope="module")
def two_ranks(jobs):
    return jobs[0]


@pytest.fixture(scope="module")
def restarted(jobs):
    return jobs[1]


@pytest.fixture(scope="module")
def four_ranks(jobs):
    return jobs[2]


@pytest.fixture(scope="module")
def single():
    return run_single()


def initial(kind, dtype=torch.float64):
    return torch.cat([p.detach().flatten().to(dtype) for p in build(kind).parameters()])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_union_of_the_minibatches(two_ranks, single, config):
    ref, ref_losses = single[config]
    assert (ref - initial(CONFIGS[config][0])).norm() > 1e-3 * ref.norm()  # the step did move
    (r0, l0), (r1, l1) = two_ranks[0]["configs"][config], two_ranks[1]["configs"][config]
    assert torch.equal(r0, r1)  # the gathered parameters agree on every rank
    assert (r0 - ref).norm() <= 1e-11 * ref.norm()
    # the returned loss is averaged over the ranks: the loss on the whole batch
    assert l0 == l1
    assert max(abs(a - b) for a, b in zip(l0, ref_losses)) <= 1e-12


@pytest.mark.parametrize("config", CONFIGS4)
def test_four_ranks_equal_one_process(four_ranks, single, config):
    ref = single[config][0]
    runs = [r["configs"][config][0] for r in four_ranks]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert (runs[0] - ref).norm() <= 1e-11 * ref.norm()


@pytest.mark.parametrize("config", CONFIGS4)
def test_hsdp_two_replicas_of_two_shards_equal_one_process(four_ranks, single, config):
    """HSDP (a 2 x 2 mesh, placements (Replicate(), Shard(0))): the reductions sum over the
    shards of one replica, the losses are averaged over all 4 ranks."""
    ref = single[config][0]
    runs = [r["hsdp"][config][0] for r in four_ranks]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert (runs[0] - ref).norm() <= 1e-11 * ref.norm()
    assert max(abs(a - b) for a, b in zip(four_ranks[0]["hsdp"][config][1], single[config][1])) <= 1e-12


@pytest.mark.parametrize("config", MP_CONFIGS)
def test_mixed_precision_bf16_parameters_fp32_reductions_follow_the_fp32_run(two_ranks, config):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): shards, gradients and OFMU's
    buffers stay float32; only the forward/backward run in bf16 (8-bit mantissa), so the update
    follows the single-process float32 run to bf16's precision, not to float rounding."""
    ref, ref_losses = run_single([config], fp32=True)[config]
    got, losses = two_ranks[0]["mp"][config]
    assert got.dtype == torch.float32
    moved = (ref - initial(CONFIGS[config][0], torch.float32)).norm()
    adam = CONFIGS[config][1].get("preconditioner") == "adam"  # Adam rescales bf16 noise
    assert (got - ref).norm() <= (0.1 if adam else 0.02) * moved
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1.5e-2


def expected_rho():
    return COMMON["rho"] * CKPT["rho_growth"] ** (2 * CKPT_STEPS)


def test_distributed_checkpoint_resumes_bit_identically(two_ranks, restarted):
    for r, job2 in zip(two_ranks, restarted):  # uninterrupted run == restarted from the checkpoint
        (a, la, rho_a), (b, lb, rho_b) = r["save"], job2["load"]
        assert torch.equal(a, b) and la == lb
        assert rho_a == rho_b == pytest.approx(expected_rho(), rel=1e-12)


def test_the_optimizer_state_in_the_checkpoint_matters(two_ranks, restarted):
    (a, _, _), (c, _, rho_c) = two_ranks[0]["save"], restarted[0]["load_model_only"]
    assert (a - c).norm() > 1e-4 * a.norm()  # Adam moments and the rho schedule were needed
    assert rho_c == pytest.approx(COMMON["rho"] * CKPT["rho_growth"] ** CKPT_STEPS, rel=1e-12)


def test_a_two_rank_checkpoint_loads_on_four_ranks(two_ranks, four_ranks):
    a, la, rho_a = two_ranks[0]["save"]
    b, lb, rho_b = four_ranks[0]["load"]
    assert (a - b).norm() <= 1e-11 * a.norm()  # resharded by DCP; reductions in another order
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-12 and rho_b == rho_a


@pytest.mark.parametrize("config", SWITCHED)
def test_param_groups_switched_to_sharded_parameters_before_the_first_step_are_followed(
        two_ranks, single, config):
    """accelerate's FSDP2 prepare builds nothing new: it shards the model under the optimizer
    and puts the DTensors into param_groups. OFMU rebuilds its buffers at the first step."""
    ref = single[config][0]
    got = two_ranks[0]["switched"][config][0]
    assert torch.equal(got, two_ranks[1]["switched"][config][0])
    assert (got - ref).norm() <= 1e-11 * ref.norm()


def test_param_groups_switched_after_steps_fail_clearly(two_ranks):
    msg = two_ranks[0]["misuse"]["switched_late"]
    assert msg.startswith("RuntimeError: the tensors in param_groups were replaced after OFMU "
                          "took steps") and "Build a new optimizer" in msg


def test_fully_shard_after_the_optimizer_was_built_fails_naming_the_parameter(two_ranks):
    msg = two_ranks[0]["misuse"]["built_before"]
    assert msg.startswith("RuntimeError: no gradient reached")
    assert "param_groups[0].params[0] (shape (9, 4))" in msg and "fully_shard()" in msg
    assert "Build the optimizer last" in msg


def test_sharded_parameters_replaced_after_construction_fail(two_ranks):
    msg = two_ranks[1]["misuse"]["replaced"]
    assert msg.startswith("RuntimeError: no gradient reached") and "re-sharding" in msg


def test_unsupported_placement_fails_naming_parameter_and_placement(two_ranks):
    msg = two_ranks[0]["misuse"]["replicate"]
    assert msg.startswith("ValueError: parameter param_groups[0].params[0] (shape (4, 3))")
    assert "(Replicate(),)" in msg and "fully_shard(model)" in msg


@pytest.mark.parametrize("case,mode", [("hvp", "similarity='hvp'"),
                                       ("forget", "outer_hvp='forget' with rho > 0"),
                                       ("exact", "outer_hvp='exact' with rho > 0"),
                                       ("rho_later", "outer_hvp='forget' and rho > 0")])
def test_second_order_modes_are_refused_on_sharded_parameters(two_ranks, case, mode):
    msg = two_ranks[0]["misuse"][case]
    assert msg.startswith("ValueError: ") and mode in msg
    assert "param_groups[0].params[0] (shape (9, 4))" in msg and "outer_hvp='fd'" in msg


def test_mixing_plain_and_sharded_parameters_is_refused(two_ranks):
    msg = two_ranks[0]["misuse"]["mixed"]
    assert "param_groups[0].params[2] (shape (3, 9)) is a plain tensor" in msg
    assert "fully_shard(model)" in msg


def test_parameters_replaced_by_load_state_dict_assign_fail_at_step():
    m = mlp()
    opt = OFMU(m.parameters(), **dict(COMMON, outer_hvp="none"))
    closure = Slices(m, "mlp", 0, 1)
    opt.step(closure)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match=r"no gradient reached .*params\[0\] \(shape \(9, 4\)\)"
                       r".*load_state_dict\(assign=True\)"):
        opt.step(closure)


def test_communication_per_step_matches_the_hand_count(two_ranks):
    """One step of the 2-rank measurement (docs/scaling.md) against counts from the algorithm:
    FSDP2 reduce-scatters one full float32 gradient per backward pass; OFMU adds only scalar
    all-reduces (3 floats per reduction, 2 losses per closure call); the replicated path
    all-reduces one whole gradient buffer per backward pass."""
    grad = 4 * sum(p.numel() for p in LM().parameters())  # every dim divides by 2: no padding
    m = two_ranks[0]["measure"]
    first, fd = m["fsdp2/ofmu-first-order"], m["fsdp2/ofmu-fd"]
    # first order, one inner + one outer step: backward passes f, r (inner) and r (outer)
    assert first["comm"]["reduce_scatter_single"][1] == 3 * grad
    assert first["comm"]["scalar all_reduce"] == (4, 2 * 3 * 4 + 2 * 2 * 4)
    assert "all_reduce" not in first["comm"]  # no whole-buffer averaging under FSDP2
    # fd: inner (f, r), outer (f, r) and two probes (f, r each); reductions: inner, outer,
    # one per probe, and reduce3(g_r, h) for the update
    assert fd["comm"]["reduce_scatter_single"][1] == 8 * grad
    assert fd["comm"]["scalar all_reduce"] == (9, 5 * 3 * 4 + 4 * 2 * 4)
    assert m["replicated/ofmu-first-order"]["comm"]["all_reduce"] == (3, 3 * grad)
    assert m["replicated/ofmu-fd"]["comm"]["all_reduce"] == (8, 8 * grad)
    gd = m["fsdp2/graddiff-adamw"]
    assert gd["comm"]["reduce_scatter_single"] == (3, grad) and "scalar all_reduce" not in gd["comm"]


def test_each_rank_holds_half_of_every_buffer(two_ranks):
    """Per-rank optimizer memory: under FSDP2 every buffer OFMU allocates (its copy of the
    parameter shard, gradients, moments, scratch) is half of the replicated path's, at least
    the parameters, two gradients and four Adam moments."""
    grad = 4 * sum(p.numel() for p in LM().parameters())
    m = two_ranks[1]["measure"]
    assert m["fsdp2/ofmu-first-order"]["param_bytes"] == grad // 2
    for mode in ("first-order", "fd"):
        full = m[f"replicated/ofmu-{mode}"]["state_bytes"]
        assert full % grad == 0 and full >= 7 * grad
        assert m[f"fsdp2/ofmu-{mode}"]["state_bytes"] * 2 == full
    # fd: the saved parameters and the accumulated outer direction, on top
    assert m["fsdp2/ofmu-fd"]["state_bytes"] == m["fsdp2/ofmu-first-order"]["state_bytes"] + 2 * grad // 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_two_rank_checkpoint_loads_into_one_unsharded_process(jobs, two_ranks):
    """DCP gathers the shards into plain tensors: a single process without torch.distributed
    resumes the 2-rank run (to float rounding: the reductions run in another order)."""
    import torch.distributed.checkpoint as dcp
    from _fsdp2_worker import ckpt_run, optimizer, steps_batches
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m = mlp()
    opt = optimizer(m, CKPT)
    model_sd, optim_sd = get_state_dict(m, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(jobs[3]))
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    closure = Slices(m, "mlp", 0, 1)
    closure.i = steps_batches(opt) * CKPT_STEPS
    losses = ckpt_run(opt, closure, CKPT_STEPS)
    a, la, rho_a = two_ranks[0]["save"]
    got = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert (got - a).norm() <= 1e-11 * a.norm()
    assert max(abs(x - y) for x, y in zip(losses, la)) <= 1e-12
    assert opt.param_groups[0]["rho_k"] == rho_a


def test_p_grad_shows_the_last_retain_gradient_as_on_one_process(two_ranks):
    ref = grads_after(GRADS_CONFIG, 0, 1, sharded=False)
    assert ref.norm() > 0
    for r in two_ranks:
        assert (r["grads"] - ref).norm() <= 1e-11 * ref.norm()


def test_checkpoint_state_dict_before_the_first_step_needs_no_step(two_ranks):
    assert two_ranks[0]["misuse"]["dcp_before_step"] == ""  # p.grad is bound at construction


def test_the_torchrun_example_in_docs_scaling_runs(jobs):
    """docs/scaling.md's example, as torchrun runs it on 2 ranks: it prints the retain loss and
    the cosine on rank 0 and writes a distributed checkpoint (one file per rank)."""
    import re

    printed = (jobs[4] / "example0.txt").read_text()
    m = re.fullmatch(r"retain loss ([\d.]+), cosine ([+-][\d.]+)\n", printed)
    assert m, printed
    assert 0.5 < float(m.group(1)) < 5.0 and abs(float(m.group(2))) <= 1.0
    assert (jobs[4] / "example1.txt").read_text() == ""
    assert sorted(p.name for p in (jobs[4] / "ckpt" / "step5").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
