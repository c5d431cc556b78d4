import os

# The Triton kernels run on CPU tensors through the interpreter when no GPU is present. The
# variable must be set before triton's @jit functions are defined (docs/triton.md).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not "gpu" in keywords: a folder named gpu
            item.add_marker(skip)
