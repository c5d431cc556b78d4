"""Where a step's cross-buffer sums meet when buffers live on several devices, and which copies
must wait (the GPU half, with real CPU and CUDA parameter groups, is in test_optimizer_gpu.py)."""

import torch
from ofmu.devices import copy_blocks, move, reduction_device
from torch.utils._python_dispatch import TorchDispatchMode

cpu, g0, g1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def test_sums_meet_on_the_first_gpu_when_there_is_one():
    assert reduction_device([cpu, g1, g0]) == g1
    assert reduction_device([g0, cpu]) == g0
    assert reduction_device([cpu, cpu]) == cpu


def test_only_copies_from_a_gpu_onto_the_cpu_wait():
    assert copy_blocks(g0, cpu)
    assert not copy_blocks(cpu, g0)  # the stream orders it before every later use
    assert not copy_blocks(g0, g1) and not copy_blocks(cpu, cpu) and not copy_blocks(g0, g0)


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((func.overloadpacket.__name__, (kwargs or {}).get("non_blocking")))
        return func(*args, **(kwargs or {}))


def test_move_on_one_device_copies_only_for_a_dtype_and_never_waits():
    t = torch.arange(3.0)
    with _Copies() as mode:
        same = move(t, cpu)
        wider = move(t, cpu, torch.float64)
    assert same is t
    assert mode.seen == [("_to_copy", True)]
    assert wider.dtype == torch.float64 and wider.tolist() == [0.0, 1.0, 2.0]
