"""state_dtype="bfloat16": the moments stored in bf16 by stochastic rounding, the bases in float32."""

import copy

import pytest
import torch
from torch import nn

from lit_cosmos import COSMOS, cosmos_param_groups, memory_report, optimizer_state_bytes
from lit_cosmos.core import kernels as F


def test_stochastic_rounding_is_exact_in_expectation():
    # x lies 1/8 of the way from bf16 1.0 to the next bf16 number, 1 + 2^-7: each entry rounds
    # up with probability 1/8, so the mean of N roundings is x up to the binomial error
    # 2^-7 sqrt(p (1 - p) / N) (4 sigma below). Both signs; zeros, infs and NaN pass through.
    N = 1 << 16
    x = torch.full((N,), 1.0 + 2.0**-10)
    out = torch.empty(N, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    sigma = 2.0**-7 * (0.125 * 0.875 / N) ** 0.5
    for sign in (1.0, -1.0):
        F.stochastic_round_(out, sign * x, g)
        assert set(out.float().unique().tolist()) == {sign * 1.0, sign * (1.0 + 2.0**-7)}
        assert abs(out.float().mean().item() - sign * x[0].item()) < 4 * sigma
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.5])
    got = F.stochastic_round_(torch.empty(6, dtype=torch.bfloat16), special, g).float()
    assert torch.equal(got[:4], special[:4]) and got[4].isnan() and got[5] == 1.5
    with pytest.raises(ValueError, match="writes float32 into bfloat16"):
        F.stochastic_round_(torch.empty(2), torch.zeros(2), g)


def test_an_average_with_small_steps_moves_only_with_stochastic_rounding():
    # m <- b m + (1 - b) g with b = 0.999: each step changes m by ~1e-3 relative, below half a
    # bf16 unit (2^-9 = 2e-3). Round-to-nearest freezes the average far from its float32 value;
    # stochastic rounding follows it (the measurement behind the choice, docs/algorithm.md).
    g = torch.Generator().manual_seed(1)
    exact, nearest = torch.zeros(4096), torch.zeros(4096, dtype=torch.bfloat16)
    stochastic = torch.zeros(4096, dtype=torch.bfloat16)
    for _ in range(3000):
        grad = 1.0 + 0.1 * torch.randn(4096, generator=g)
        exact.lerp_(grad, 1e-3)
        nearest.copy_(nearest.float().lerp_(grad, 1e-3))
        F.stochastic_round_(stochastic, stochastic.float().lerp_(grad, 1e-3), g)
    target = exact.mean().item()  # 1 - 0.999^3000 = 0.950
    assert abs(nearest.float().mean().item() - target) > 0.3
    assert abs(stochastic.float().mean().item() - target) < 0.01


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 40))


def _train(net, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (8, 6), generator=g)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_state_dtypes_and_memory():
    net = _net()
    opt = COSMOS(cosmos_param_groups(net), rank=4, state_dtype="bfloat16")
    _train(net, opt, 2)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            moments = ("M", "V") if group["algorithm"] == "cosmos" else ("exp_avg", "exp_avg_sq")
            assert all(st[k].dtype == torch.bfloat16 for k in moments)
            assert all(v.dtype == torch.float32 for k, v in st.items() if k not in moments)
    assert optimizer_state_bytes(opt, include_step=False) == memory_report(opt.param_groups)["cosmos"]
    full = COSMOS(cosmos_param_groups(_net()), rank=4)
    assert memory_report(full.param_groups)["cosmos"] > memory_report(opt.param_groups)["cosmos"]


def test_bf16_state_trains_like_float32_state():
    # The moments differ from float32 ones by rounding of 2^-8 relative per step, unbiased:
    # the losses of the two runs stay within a few percent of each other while both fall.
    a, b = _net(), _net()
    loss32 = _train(a, COSMOS(cosmos_param_groups(a), rank=4, lr=3e-2), 30)
    loss16 = _train(b, COSMOS(cosmos_param_groups(b), rank=4, lr=3e-2, state_dtype="bfloat16"), 30)
    assert loss32[-1] < 0.6 * loss32[0] and loss16[-1] < 0.6 * loss16[0]
    assert abs(loss16[-1] - loss32[-1]) < 0.05 * loss32[-1], (loss16[-1], loss32[-1])


def test_bf16_state_resumes_bitwise_and_checkpoints_load_into_either_storage():
    net = _net()
    opt = COSMOS(cosmos_param_groups(net), rank=4, state_dtype="bfloat16")
    _train(net, opt, 3)
    saved_net, saved = copy.deepcopy(net), copy.deepcopy(opt.state_dict())
    _train(net, opt, 3, seed=1)
    # the rounding bits come from (step, position): a resumed run rounds exactly alike
    resumed = COSMOS(cosmos_param_groups(saved_net), rank=4, state_dtype="bfloat16")
    resumed.load_state_dict(saved)
    _train(saved_net, resumed, 3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), saved_net.parameters()))
    # bf16 -> float32 storage is exact; float32 -> bf16 rounds once to nearest
    full = COSMOS(cosmos_param_groups(_net()), rank=4)
    full.load_state_dict(resumed.state_dict())
    assert all(g["state_dtype"] == "float32" for g in full.param_groups)
    for p, q in zip(full.state, resumed.state):
        for key, value in resumed.state[q].items():
            assert full.state[p][key].dtype == (torch.float32 if value.dtype == torch.bfloat16 else value.dtype)
            assert torch.equal(full.state[p][key], value.to(full.state[p][key].dtype))
    half = COSMOS(cosmos_param_groups(_net()), rank=4, state_dtype="bfloat16")
    half.load_state_dict(full.state_dict())
    for p, q in zip(half.state, resumed.state):
        for key, value in resumed.state[q].items():
            assert torch.equal(half.state[p][key], value)


def test_invalid_state_dtype_raises():
    with pytest.raises(ValueError, match=r"state_dtype='float16'"):
        COSMOS(cosmos_param_groups(_net()), state_dtype="float16")
