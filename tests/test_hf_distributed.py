"""OFMUTrainer in a 2-process torchrun job (gloo, CPU): every rank takes the single-process
step on the union of the ranks' minibatches, without a DDP wrapper."""

import os
import socket
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _hf_common import _memorised_state, flat_params  # noqa: E402
from _hf_dist_worker import PER_DEVICE, run  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    state = tmp_path / "memorised.pt"
    torch.save(_memorised_state("llama"), state)
    worker = os.path.join(os.path.dirname(__file__), "_hf_dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), worker,
           str(tmp_path), str(state)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:  # the one-process reference runs while the workers start up
        single_trainer, single = run(tmp_path / "single", state, per_device=2 * PER_DEVICE)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and not r0["ddp"] and not r1["ddp"]
    assert torch.equal(r0["params"], r1["params"])  # ranks never drift apart

    start = torch.cat([t.double().flatten() for t in _memorised_state("llama").values()])
    moved = (flat_params(single) - start).norm()
    assert moved > 1e-3
    # fp32 rounding, amplified ~1/fd_delta by the finite-difference HVP; without the
    # cross-rank average the two runs differ by the half-batch gradient noise (order 1)
    assert (r0["params"] - flat_params(single)).norm() <= 1e-4 * moved
    # the logged losses are means over both ranks' minibatches
    for key in ("forget_loss", "retain_loss"):
        two = [h[key] for h in r0["log"] if key in h]
        one = [h[key] for h in single_trainer.state.log_history if key in h]
        assert len(two) == len(one) == 1 and two[0] == pytest.approx(one[0], rel=1e-5)
