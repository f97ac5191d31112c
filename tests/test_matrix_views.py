"""Matrix views: expert stacks, transposed (Conv1D) weights and split (fused) weights are COSMOS on
their matrices, exactly as if each matrix were a parameter of its own in nn.Linear layout.

Every twin runs in float64 with full-precision Newton-Schulz, where the only differences between
the two computations are summation orders inside matmuls (batched vs one at a time, strided vs
contiguous): a few float64 roundoffs, far below the 1e-10 bound.
"""

import copy

import pytest
import torch
from _numerics import U32
from torch import nn

from lit_cosmos import COSMOS, formula_numel, memory_report, optimizer_state_bytes
from lit_cosmos.core.matrices import DEFAULT_RANK, group_view, matrix_view
from lit_cosmos.core.memory import state_numel

KW = dict(lr=3e-2, rank=3, ns_dtype="float32", weight_decay=0.1, update_interval=2)
STEPS = 5
TOL = 1e-10


def _param(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))


def _grad(shape, step, seed):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _run(groups, grads_of_step, steps=STEPS, **kw):
    opt = COSMOS(groups, **{**KW, **kw})
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in range(steps):
        for p, g in zip(params, grads_of_step(s)):
            p.grad = g
        opt.step()
    return opt


# ---------------------------------------------------------------------------- the view rule
def test_views_of_each_layout():
    v = matrix_view((7, 5))
    assert (v.layout, v.batch, v.m, v.n, v.parts) == ("linear", 1, 7, 5, (7,))
    v = matrix_view((5, 7), "transposed")
    assert (v.m, v.n) == (7, 5)
    v = matrix_view((4, 6, 5), "stack")
    assert (v.batch, v.m, v.n, v.count) == (4, 6, 5, 4)
    v = matrix_view((8, 3, 3, 3))
    assert (v.layout, v.m, v.n) == ("flatten", 8, 27)
    v = matrix_view((12, 5), split=3)
    assert v.parts == (4, 4, 4) and v.offsets == (0, 4, 8) and v.count == 3
    v = matrix_view((16, 5), split=(8, 4, 4))
    assert v.rank(DEFAULT_RANK) == 4 and v.offsets == (0, 8, 12)
    # state: E (mn + mr) + c (nr + r^2)
    v = matrix_view((2, 6, 5), "stack", split=2)
    r = v.rank(2)
    assert v.state_shapes(r) == {"M": (2, 6, 5), "U": (2, 2, 5, 2), "S": (2, 2, 2, 2), "V": (2, 6, 2)}
    assert v.state_numel(r) == 2 * (30 + 12) + 4 * (10 + 4)


@pytest.mark.parametrize(
    "shape, layout, split, message",
    [
        ((4, 5), "rows", None, r"matrix_layout='rows' must be one of"),
        ((4, 5, 6), "linear", None, r"matrix_layout='linear' needs a 2-D weight, got shape \(4, 5, 6\)"),
        ((4, 5), "stack", None, r"needs a 3-D \(E, out, in\) weight"),
        ((12, 5), "auto", 5, r"split=5 must be an int >= 1 that divides the 12 rows"),
        ((12, 5), "auto", (8, 3), r"split=\(8, 3\) must be row counts >= 1 that sum to the 12 rows"),
        ((12, 5), "auto", (12, 0), r"split=\(12, 0\)"),
    ],
)
def test_bad_views_raise(shape, layout, split, message):
    with pytest.raises(ValueError, match=message):
        matrix_view(shape, layout, split)


def test_bad_group_options_raise_naming_the_group():
    w = _param((12, 5), 0)
    with pytest.raises(ValueError, match=r"invalid split=5 .* in param group 'qkv' \(parameter of shape \(12, 5\)\)"):
        COSMOS([{"params": [w], "algorithm": "cosmos", "split": 5, "name": "qkv"}])
    with pytest.raises(ValueError, match=r"matrix_layout='stack' needs a 3-D"):
        COSMOS([{"params": [w], "algorithm": "cosmos", "matrix_layout": "stack"}])


# ---------------------------------------------------------------------------- exact twins
def _assert_close(a, b):
    err = (a - b).abs().max().item()
    assert err < TOL * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("batch", [False, True])
def test_transposed_weight_is_cosmos_on_its_transpose(batch):
    shape = (5, 7)  # (in, out), like transformers' Conv1D
    p, q = _param(shape, 1), nn.Parameter(_param(shape, 1).detach().T.clone())
    _run([{"params": [p], "algorithm": "cosmos", "matrix_layout": "transposed"}],
         lambda s: [_grad(shape, s, 1)], batch=batch)
    _run([{"params": [q], "algorithm": "cosmos"}], lambda s: [_grad(shape, s, 1).T.contiguous()], batch=batch)
    _assert_close(p.detach().T, q.detach())


@pytest.mark.parametrize("batch", [False, True])
def test_expert_stack_is_cosmos_on_each_expert(batch):
    shape = (3, 4, 6)
    p = _param(shape, 2)
    experts = [nn.Parameter(p.detach()[e].clone()) for e in range(shape[0])]
    opt = _run([{"params": [p], "algorithm": "cosmos", "matrix_layout": "stack"}],
               lambda s: [_grad(shape, s, 2)], batch=batch)
    ref = _run([{"params": experts, "algorithm": "cosmos"}], lambda s: list(_grad(shape, s, 2).unbind(0)),
               batch=batch)
    for e, q in enumerate(experts):
        _assert_close(p.detach()[e], q.detach())
        for key in ("M", "V", "S"):
            _assert_close(opt.state[p][key][e], ref.state[q][key])
        U, U_ref = opt.state[p]["U"][e], ref.state[q]["U"]
        _assert_close(U @ U.T, U_ref @ U_ref.T)  # the same span (eigenvector signs are free)


@pytest.mark.parametrize("split, rank", [(3, 3), ((8, 4, 4), 5)])
def test_split_weight_is_cosmos_on_each_part(split, rank):
    parts = [4] * split if isinstance(split, int) else list(split)
    shape = (sum(parts), 6)
    p = _param(shape, 3)
    pieces = [nn.Parameter(x.clone()) for x in p.detach().split(parts)]
    r = min(rank, 6, *parts)  # every part gets the same rank: min(rank, n, smallest part)
    _run([{"params": [p], "algorithm": "cosmos", "split": split}], lambda s: [_grad(shape, s, 3)], rank=rank)
    _run([{"params": pieces, "algorithm": "cosmos"}], lambda s: list(_grad(shape, s, 3).split(parts)), rank=r)
    for got, want in zip(p.detach().split(parts), pieces):
        _assert_close(got, want.detach())


def test_transposed_split_weight_is_gpt2_c_attn_as_q_k_v():
    d = 4
    shape = (d, 3 * d)  # Conv1D c_attn: (in, 3 out)
    p = _param(shape, 4)
    pieces = [nn.Parameter(x.clone()) for x in p.detach().T.split(d)]  # Q, K, V in nn.Linear layout
    _run([{"params": [p], "algorithm": "cosmos", "matrix_layout": "transposed", "split": 3}],
         lambda s: [_grad(shape, s, 4)])
    _run([{"params": pieces, "algorithm": "cosmos"}], lambda s: [x.contiguous() for x in _grad(shape, s, 4).T.split(d)])
    for got, want in zip(p.detach().T.split(d), pieces):
        _assert_close(got, want.detach())


def test_split_expert_stack_is_cosmos_on_each_part_of_each_expert():
    shape = (2, 6, 5)
    p = _param(shape, 5)
    pieces = [nn.Parameter(x.clone()) for e in range(2) for x in p.detach()[e].split(3)]
    _run([{"params": [p], "algorithm": "cosmos", "matrix_layout": "stack", "split": 2}],
         lambda s: [_grad(shape, s, 5)])
    _run([{"params": pieces, "algorithm": "cosmos"}],
         lambda s: [x.contiguous() for e in range(2) for x in _grad(shape, s, 5)[e].split(3)])
    got = [x for e in range(2) for x in p.detach()[e].split(3)]
    for g, want in zip(got, pieces):
        _assert_close(g, want.detach())


def test_views_mix_with_plain_matrices_in_one_group_and_a_batched_bucket():
    # Two same-shape parts of a split weight and a plain matrix of that shape share a bucket.
    a, b = _param((8, 5), 6), _param((4, 5), 7)
    pieces = [nn.Parameter(x.clone()) for x in a.detach().split(4)] + [nn.Parameter(b.detach().clone())]
    _run([{"params": [a], "algorithm": "cosmos", "split": 2}, {"params": [b], "algorithm": "cosmos"}],
         lambda s: [_grad((8, 5), s, 6), _grad((4, 5), s, 7)], batch=True)
    _run([{"params": pieces, "algorithm": "cosmos"}],
         lambda s: list(_grad((8, 5), s, 6).split(4)) + [_grad((4, 5), s, 7)], batch=True)
    for got, want in zip([*a.detach().split(4), b.detach()], pieces):
        _assert_close(got, want.detach())


# ---------------------------------------------------------------------------- state and memory
CASES = [
    ((3, 4, 6), "stack", None),
    ((5, 7), "transposed", None),
    ((12, 5), "auto", 3),
    ((16, 5), "auto", (8, 4, 4)),
    ((2, 6, 5), "stack", 2),
    ((6, 2, 3, 3), "flatten", None),
]


@pytest.mark.parametrize("shape, layout, split", CASES)
def test_state_is_the_formula_and_the_view_checks_it(shape, layout, split):
    p = _param(shape, 8).float()
    p = nn.Parameter(p.detach())
    group = {"params": [p], "algorithm": "cosmos", "matrix_layout": layout, "split": split}
    opt = COSMOS([group], rank=2)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    view = group_view(opt.param_groups[0], p)
    assert {k: tuple(v.shape) for k, v in st.items() if k != "step"} == view.state_shapes(view.rank(2))
    assert state_numel(st) == formula_numel(shape, "cosmos", 2, layout=layout, split=split)
    assert optimizer_state_bytes(opt, include_step=False) == memory_report(opt.param_groups)["cosmos"]
    assert all(v.is_contiguous() for v in st.values())


def test_stack_memory_is_experts_times_the_matrix_formula():
    E, m, n, r = 8, 64, 32, 16
    assert formula_numel((E, m, n), "cosmos", r, layout="stack") == E * (m * n + m * r + n * r + r * r)
    assert formula_numel((E, m, n), "soap", r, layout="stack") == E * (2 * m * n + 2 * m * m + 2 * n * n)
    assert formula_numel((E, m, n), "muon", r, layout="stack") == E * m * n


@pytest.mark.parametrize("shape, layout, split", CASES[:5])
def test_state_dict_round_trip_resumes_bitwise(shape, layout, split):
    group = lambda p: [{"params": [p], "algorithm": "cosmos", "matrix_layout": layout, "split": split}]  # noqa: E731
    p = _param(shape, 9)
    opt = COSMOS(group(p), **KW)
    for s in range(3):
        p.grad = _grad(shape, s, 9)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    resumed = COSMOS(group(q), **KW)
    resumed.load_state_dict(saved)
    for s in range(3, 6):
        p.grad, q.grad = _grad(shape, s, 9), _grad(shape, s, 9)
        opt.step()
        resumed.step()
    assert torch.equal(p, q)
    for key, value in opt.state[p].items():
        assert torch.equal(value, resumed.state[q][key]), key


def test_a_state_of_another_layout_is_refused_before_anything_loads():
    p = _param((12, 5), 10)
    opt = COSMOS([{"params": [p], "algorithm": "cosmos", "split": 3}], rank=2)
    p.grad = _grad((12, 5), 0, 10)
    opt.step()
    saved = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    plain = COSMOS([{"params": [q], "algorithm": "cosmos"}], rank=2)
    with pytest.raises(ValueError, match=r"has saved 'U' of shape \(3, 5, 2\), expected \(5, 2\)"):
        plain.load_state_dict(saved)
    assert not plain.state


def test_changing_the_layout_after_the_first_step_raises_with_nothing_changed():
    p = _param((12, 5), 11)
    opt = COSMOS([{"params": [p], "algorithm": "cosmos"}], rank=2)
    p.grad = _grad((12, 5), 0, 11)
    opt.step()
    before = copy.deepcopy(opt.state[p]), p.detach().clone()
    opt.param_groups[0]["split"] = 3
    with pytest.raises(ValueError, match=r"layout and split are fixed at its first step. Nothing was changed"):
        opt.step()
    assert torch.equal(p, before[1])
    assert all(torch.equal(v, before[0][k]) for k, v in opt.state[p].items())


def test_monitors_see_the_matrices_of_stacks_and_split_weights():
    from lit_cosmos.callbacks import SubspaceMonitor
    from lit_cosmos.lightning.callbacks.memory_monitor import memory_figures

    stack, fused = nn.Parameter(torch.randn(3, 6, 5)), nn.Parameter(torch.randn(12, 5))
    opt = COSMOS([{"params": [("experts", stack)], "algorithm": "cosmos", "matrix_layout": "stack"},
                  {"params": [("qkv", fused)], "algorithm": "cosmos", "split": 3}], rank=2)
    for _ in range(2):
        stack.grad, fused.grad = torch.randn_like(stack), torch.randn_like(fused)
        opt.step()
    values = SubspaceMonitor(update_rms=False).measure(opt)
    U = opt.state[stack]["U"]
    want = sum((stack.grad[e] @ U[e]).square().sum() for e in range(3)) / stack.grad.square().sum()
    # Two float32 evaluations of ||G U||^2 / ||G||^2: sums of at most N = 90 squares of inner
    # products of length n = 5, each within ~(2n + 2N) u of exact (gamma_k = k u), so apart by
    # at most twice that.
    energy_tol = 4 * (5 + 90) * U32
    assert abs(values["energy"]["experts"] - want.item()) < energy_tol
    U = opt.state[fused]["U"]
    want = sum((fused.grad[4 * i:4 * i + 4] @ U[i]).square().sum() for i in range(3)) / fused.grad.square().sum()
    assert abs(values["energy"]["qkv"] - want.item()) < energy_tol
    assert set(values["ns_error"]) == {"experts", "qkv"}
    figures = memory_figures([opt])
    assert figures["memory/state_bytes_model"] == figures["memory/formula_bytes/cosmos"]
