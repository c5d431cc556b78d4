"""Flat buffers: layout, aliasing, padding."""

import pytest
import torch
from _reference import PaperOFMU as OFMU  # the paper-form defaults these tests assume
from ofmu.flat import FlatBuffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_layout_is_aligned_and_views_alias_one_storage(dtype):
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((3,), (5, 7), (1,), (2, 2, 3))]
    values = [p.detach().clone() for p in params]
    buf = FlatBuffer(params, [f"p{i}" for i in range(4)])
    item = buf.param.element_size()
    assert all(o * item % 16 == 0 for o in buf.offsets)
    assert buf.numel % 64 == 0 and buf.numel >= sum(p.numel() for p in params)
    base, end = buf.param.data_ptr(), buf.param.data_ptr() + buf.numel * item
    for p, v in zip(params, values):
        assert base <= p.data_ptr() < end and torch.equal(p.detach(), v)
    used = torch.zeros(buf.numel, dtype=torch.bool)
    for p, o in zip(params, buf.offsets):
        used[o : o + p.numel()] = True
    assert not buf.param[~used].any()
    buf.bind_grads("f")
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(params, buf.buffer("f")[1]))


def test_padding_stays_zero_through_steps():
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    opt = OFMU(m.parameters(), lr=0.1, inner_steps=2, weight_decay=0.1, rho=0.2,
               preconditioner="adam")
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.step(lambda: (m(x).pow(2).mean(), (m(x) - 1).pow(2).mean()))
    buf = opt.flat_buffers[0]
    used = torch.zeros(buf.numel, dtype=torch.bool)
    for p, o in zip(buf.params, buf.offsets):
        used[o : o + p.numel()] = True
    for name in ("param", "f", "r", "outer_exp_avg", "inner_exp_avg_sq"):
        assert not buf.buffer(name)[0][~used].any(), name
