"""torch.distributed (gloo, 2 CPU processes): every rank takes the single-process step."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from _dist_worker import CONFIGS, run_configs

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    worker = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, worker, str(out), str(free_port())], check=True,
                   timeout=300, env=env)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks, config):
    single = run_configs(rank=0, world=1)[config]
    r0, r1 = two_ranks[0][config], two_ranks[1][config]
    assert torch.equal(r0, r1)  # ranks never drift apart
    assert (r0 - single).norm() <= 1e-12 * single.norm()
    assert (single - run_configs(0, 1)[config]).norm() == 0


def test_exact_hvp_is_refused_across_ranks(two_ranks):
    assert "outer_hvp='exact'" in two_ranks[0]["exact_error"]
