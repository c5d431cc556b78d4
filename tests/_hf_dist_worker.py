"""Worker for tests/test_hf_distributed.py: OFMUTrainer on 2 gloo processes (torchrun).

Run as ``torchrun --nproc_per_node 2 _hf_dist_worker.py OUT_DIR STATE_FILE``; every rank loads
the memorised weights from STATE_FILE, trains, and saves its parameters to OUT_DIR/rankN.pt.
"""

import os
import sys

import torch
import torch.distributed as dist
import transformers
from _hf_common import config, flat_params, trainer

STEPS, PER_DEVICE = 4, 2
# Plain (SGD) steps keep the comparison with one process linear in the gradients (Adam turns
# rounding noise in near-zero gradients into full-size steps); fd exercises same_batch reuse.
OFMU_KWARGS = dict(inner_lr=0.02, inner_steps=1, outer_steps=1, beta=0.8, rho=0.05,
                   similarity="project", outer_hvp="fd", preconditioner="sgd")


def run(out_dir, state_file, per_device, steps=STEPS):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("llama"))
    model.load_state_dict(torch.load(state_file))
    tr = trainer(model, out_dir, OFMU_KWARGS, max_steps=steps, learning_rate=0.05,
                 per_device_train_batch_size=per_device, logging_steps=steps)
    tr.train()
    return tr, model


if __name__ == "__main__":
    out_dir, state_file = sys.argv[1], sys.argv[2]
    tr, model = run(out_dir, state_file, PER_DEVICE)
    rank = dist.get_rank()
    torch.save({"params": flat_params(model), "world": dist.get_world_size(),
                "ddp": isinstance(tr.model_wrapped, torch.nn.parallel.DistributedDataParallel),
                "log": tr.state.log_history}, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave together and tear the group down: a rank exiting while the other's gloo threads are
    # still alive can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
