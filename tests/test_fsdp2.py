"""OFMU on FSDP2-sharded models (gloo, CPU processes): every rank updates its own shard, and
the result equals the single-process run on the union of the minibatches; misuse fails clearly.

One spawn per rank count (tests/_fsdp2_worker.py runs every config there); the single-process
reference runs here, on plain parameters and whole batches.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from _fsdp2_worker import COMMON, CONFIGS, Slices, mlp, run_single
from ofmu import OFMU

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out, world, parts):
    worker = os.path.join(os.path.dirname(__file__), "_fsdp2_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, worker, str(out), str(free_port()), str(world), parts],
                   check=True, timeout=300, env=env)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("fsdp2"), 2, "configs,misuse")


@pytest.fixture(scope="module")
def single():
    return run_single()


def initial(kind):
    from _fsdp2_worker import build
    return torch.cat([p.detach().flatten() for p in build(kind).parameters()])


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
    opt = OFMU(m.parameters(), **COMMON, outer_hvp="none")
    closure = Slices(m, "mlp", 0, 1)
    opt.step(closure)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match=r"no gradient reached .*params\[0\] \(shape \(9, 4\)\)"
                       r".*load_state_dict\(assign=True\)"):
        opt.step(closure)
