"""COSMOS against references: AdamW, Muon, closed-form invariants, frozen values, round trips."""

import copy
import io
import math

import pytest
import torch
from _numerics import SAFETY, U32, cosmos_twin, rel_err, twin_deviation
from torch import nn

from lit_cosmos import COSMOS, formula_numel, optimizer_state_bytes
from lit_cosmos.core import kernels as F
from lit_cosmos.core.memory import state_numel


def _params(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _run(opt, params, steps, seed=10, grad_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = grad_scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        opt.step()


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


# ------------------------------------------------------------------ frozen regression values
def test_frozen_values_three_seeded_steps():
    # Produced in float64 by this implementation (which matches the authors' float64 trajectory
    # to 2e-9, see test_reference.py) with: torch.manual_seed(1234); W = randn(6,4), randn(3,5),
    # randn(5), cast to float64; COSMOS(lr=0.01, rank=2, ns_dtype="float32", weight_decay=0.1);
    # gradients randn from Generator().manual_seed(99), in order, cast to float64, 3 steps.
    # float64 because a float32 run moves by its BLAS's rounding (2.7e-6 here between float32
    # and float64) and so differs between CPUs; the float32 values lit_cosmos 0.1.0 froze agree
    # with these to 5e-7.
    torch.manual_seed(1234)
    ps = [nn.Parameter(torch.randn(6, 4).double()), nn.Parameter(torch.randn(3, 5).double()),
          nn.Parameter(torch.randn(5).double())]
    opt = COSMOS(ps, lr=0.01, rank=2, ns_dtype="float32", weight_decay=0.1)
    g = torch.Generator().manual_seed(99)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).double()
        opt.step()
    frozen = [
        ([-0.115149225949, -0.488831762866, 0.160418571748, -0.877329900229], -3.55781098941),
        ([-0.199736915562, 0.873444868139, -0.672986883447, 0.63477567862], -1.07271227246),
        ([2.49563714578, 0.470522053564, 0.265831876488, -0.806331112994], 2.40068896306),
    ]
    # The values are printed to 12 digits (5e-12); float64 roundoff moves them by ~u * 50 = 1e-14.
    for p, (head, total) in zip(ps, frozen):
        want = torch.tensor(head, dtype=torch.float64)
        torch.testing.assert_close(p.detach().flatten()[:4], want, atol=1e-10, rtol=0)
        assert p.detach().sum().item() == pytest.approx(total, abs=1e-10)


# ------------------------------------------------------------------ limits: AdamW and Muon
@pytest.mark.parametrize("wd,betas,eps", [(0.0, (0.9, 0.999), 1e-8), (0.1, (0.8, 0.95), 1e-6)])
def test_adamw_groups_equal_torch_adamw(wd, betas, eps):
    ps = _params((5,), (3, 4), (2, 3, 2), seed=1)
    ref = _clone(ps)
    opt = COSMOS([{"params": ps, "algorithm": "adamw", "betas": betas}], lr=1e-2, weight_decay=wd, eps=eps)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=betas, weight_decay=wd, eps=eps)
    _run(opt, ps, 10)
    _run(ref_opt, ref, 10)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_adamw_group_default_betas_are_adamw_betas():
    p = _params((4,))
    opt = COSMOS([{"params": p, "algorithm": "adamw"}], adamw_betas=(0.8, 0.9))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_rank_zero_is_muon_direction(shape):
    (p,) = _params(shape, seed=2)
    q = nn.Parameter(p.detach().clone())
    lr = 0.02
    opt = COSMOS([p], lr=lr, lr_ratio=1.0, rank=0, weight_decay=0.0, betas=(0.9, 0.95))
    muon = torch.optim.Muon([q], lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        grad = torch.randn(shape, generator=g)
        before_p, before_q = p.detach().clone(), q.detach().clone()
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        muon.step()
        dp, dq = p.detach() - before_p, q.detach() - before_q
        # COSMOS rescales to per-entry RMS lr_ratio*lr; Muon scales by its own rule: compare directions.
        assert dp.square().mean().sqrt().item() == pytest.approx(lr, rel=1e-4)
        cos = (dp * dq).sum() / (dp.norm() * dq.norm())
        assert cos.item() > 0.998  # both run NS in bf16, from differently rounded inputs
        p.data.copy_(q.detach())  # keep both on the same iterate (momenta stay in lockstep)


def test_rank_full_leaves_no_residual():
    (p,) = _params((10, 6), seed=4)
    q = nn.Parameter(p.detach().clone())
    a = COSMOS([p], rank=6, gamma=0.2, ns_dtype="float32")
    b = COSMOS([q], rank=6, gamma=0.9, ns_dtype="float32")
    _run(a, [p], 5)
    _run(b, [q], 5)
    torch.testing.assert_close(p, q, atol=1e-5, rtol=0)  # gamma weights a residual that is ~0
    st = a.state[p]
    _, R = F.project(st["M"].unsqueeze(0), st["U"].unsqueeze(0))
    assert R.norm() < 1e-5 * st["M"].norm()


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("interval", [1, 3])
def test_invariants_after_several_steps(interval):
    lr, ratio, wd = 3e-3, 0.25, 0.1
    ps = _params((12, 8), (12, 8), (7, 15), seed=5)
    opt = COSMOS(ps, lr=lr, lr_ratio=ratio, rank=4, weight_decay=wd, update_interval=interval)
    g = torch.Generator().manual_seed(6)
    for _ in range(7):
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        for p, w in zip(ps, before):
            delta = w * (1 - lr * wd) - p.detach()
            assert delta.square().mean().sqrt().item() == pytest.approx(ratio * lr, rel=1e-4)
    for p in ps:
        st = opt.state[p]
        U, S, V, M = st["U"], st["S"], st["V"], st["M"]
        assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (U, S, V, M))
        torch.testing.assert_close(U.mT @ U, torch.eye(U.shape[1]), atol=1e-5, rtol=0)
        # Each product that builds S, (GU)^T (GU) (inner size m) and T^T S T (2 x inner size r),
        # rounds entry (i, j) and (j, i) apart by at most 2 gamma_k max|S| (Cauchy-Schwarz bounds
        # |A|^T |A| by A^T A's diagonal), and the EMA weights sum to <= 1.
        sym_tol = 2 * (p.shape[0] + 2 * U.shape[1] + 2) * U32 * S.abs().max().item()
        torch.testing.assert_close(S, S.mT, atol=sym_tol, rtol=0)
        assert torch.linalg.eigvalsh(S).min() > -S.shape[0] * sym_tol  # PSD up to ||rounding||_2
        assert bool((V >= 0).all())
        _, R = F.project(M.unsqueeze(0), U.unsqueeze(0))
        assert (R[0] @ U).abs().max() < 1e-5


def test_update_interval_keeps_basis_between_refreshes():
    (p,) = _params((9, 7), seed=7)
    opt = COSMOS([p], rank=3, update_interval=3)
    bases = []
    g = torch.Generator().manual_seed(8)
    for _ in range(7):
        p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        bases.append(opt.state[p]["U"].clone())
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 7)]
    # steps 2..7: refresh at t = 3 and 6 only
    assert changed == [False, True, False, False, True, False]


def test_request_refresh_with_manual_interval_and_extra_power_iterations():
    (p,) = _params((20, 10), seed=9)
    opt = COSMOS([p], rank=2, update_interval=0, betas=(0.9, 0.5))
    _run(opt, [p], 3, seed=1)
    U0 = opt.state[p]["U"].clone()
    _run(opt, [p], 1, seed=2)
    assert torch.equal(opt.state[p]["U"], U0)  # interval 0: no automatic refresh
    opt.request_refresh(power_iters=100)
    assert opt.refresh_requested
    S_old = opt.state[p]["S"].clone().double()
    G = torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    p.grad = G.clone()
    opt.step()
    assert not opt.refresh_requested
    H = 0.5 * U0.double() @ S_old @ U0.double().mT + 0.5 * G.double().mT @ G.double()
    want = F.top_eigenvectors(H, 2)
    U = opt.state[p]["U"].double()
    torch.testing.assert_close(U @ U.mT, want @ want.mT, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="power_iters must be a positive int, got 0"):
        opt.request_refresh(power_iters=0)


def test_conv_weight_in_cosmos_group_uses_flattened_matrix():
    conv = nn.Conv2d(3, 8, 3)
    opt = COSMOS([{"params": [conv.weight], "algorithm": "cosmos"}], rank=4)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    st = opt.state[conv.weight]
    assert st["M"].shape == conv.weight.shape and st["U"].shape == (27, 4) and st["V"].shape == (8, 4)


def test_plain_parameters_route_by_dimension():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Conv1d(5, 2, 3))
    opt = COSMOS(model.parameters())
    algs = {tuple(p.shape): g["algorithm"] for g in opt.param_groups for p in g["params"]}
    assert algs[(5, 4)] == "cosmos"
    assert algs[(5,)] == "adamw" and algs[(2, 5, 3)] == "adamw"


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
def test_batched_equals_one_matrix_at_a_time(ns_dtype):
    ps = _params((8, 6), (8, 6), (8, 6), (6, 8), seed=11)
    initial, singles = _clone(ps), _clone(ps)
    opt = COSMOS(ps, rank=3, batch=True, ns_dtype=ns_dtype)
    opts = [COSMOS([q], rank=3, ns_dtype=ns_dtype) for q in singles]
    g = torch.Generator().manual_seed(12)
    grads = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(4)]
    for step in grads:
        for p, q, grad in zip(ps, singles, step):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        for o in opts:
            o.step()
    # Batched kernels (bmm, batched QR) may round unlike per-matrix ones, and a float32 input
    # that rounds the other way to bf16 moves the bf16 Newton-Schulz by 2^-8: each run is within
    # SAFETY times its float64 twin's deviation of exact arithmetic, the two within twice that.
    tol = twin_deviation(lambda rounding: cosmos_twin(initial, grads, rounding, rank=3, ns_dtype=ns_dtype)[0])
    for p, q, t in zip(ps, singles, tol):
        torch.testing.assert_close(p, q, atol=2 * SAFETY * t, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_use_fp32_state(dtype):
    ps32 = _params((16, 12), (12,), seed=13)
    ps16 = [nn.Parameter(p.detach().to(dtype)) for p in ps32]
    o32, o16 = COSMOS(ps32, rank=4), COSMOS(ps16, rank=4)
    _run(o32, ps32, 3)
    _run(o16, ps16, 3)
    for st in o16.state.values():
        assert all(t.dtype == torch.float32 for t in st.values())
    for p, q in zip(ps16, ps32):
        assert p.dtype == dtype
        assert (p.float() - q).abs().max() < 0.02
    # a state_dict round trip keeps the float32 state (torch would cast it to the param dtype)
    o16.load_state_dict(o16.state_dict())
    assert all(t.dtype == torch.float32 for st in o16.state.values() for t in st.values())
    _run(o16, ps16, 1)


def test_schedulers_change_group_lr():
    (p,) = _params((6, 4))
    opt = COSMOS([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        p.grad = torch.randn(6, 4)
        before = p.detach().clone()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        delta = before * (1 - lr * 0.1) - p.detach()
        assert delta.square().mean().sqrt().item() == pytest.approx(0.2 * lr, rel=1e-4)


# ------------------------------------------------------------------ robustness
def test_zero_gradient_changes_only_weight_decay():
    ps = _params((6, 5), (5,), seed=14)
    before = [p.detach().clone() for p in ps]
    opt = COSMOS(ps, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, w in zip(ps, before):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), w * (1 - 1e-3) ** 2)
    assert all(torch.isfinite(t).all() for st in opt.state.values() for t in st.values())


@pytest.mark.parametrize("zero_grad", [True, False])
def test_lr_zero_changes_no_parameter(zero_grad):
    ps = _params((6, 5), (4, 7), (5,), seed=15)
    opt = COSMOS(ps, lr=1e-2, weight_decay=0.1)
    _run(opt, ps, 2)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.zeros_like(p) if zero_grad else torch.randn_like(p)
    opt.step()
    for p, w in zip(ps, before):
        assert torch.equal(p.detach(), w)


def test_grad_is_never_modified_and_params_without_grad_are_skipped():
    a, b, c = _params((6, 5), (6, 5), (5,), seed=16)
    opt = COSMOS([a, b, c], rank=2)
    a.grad = torch.randn(6, 5)
    c.grad = torch.randn(5)
    grads = [a.grad.clone(), c.grad.clone()]
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(a.grad, grads[0]) and torch.equal(c.grad, grads[1])
    assert torch.equal(b.detach(), b_before) and b not in opt.state


def test_closure_is_called_with_grad_enabled():
    (p,) = _params((4, 3))
    opt = COSMOS([p])
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = (x @ p.mT).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_state_untouched(bad):
    ps = _params((6, 5), (5,), seed=17)
    opt = COSMOS(ps)
    _run(opt, ps, 2)
    state = {k: v.clone() for st in opt.state.values() for k, v in st.items()}
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[0].grad[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite .* gradient for parameter #0 of param group 0 of shape \(6, 5\)"):
        opt.step()
    after = {k: v for st in opt.state.values() for k, v in st.items()}
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(p.detach(), w) for p, w in zip(ps, before))

    skip = COSMOS(ps, on_nonfinite="skip")
    skip.step()
    assert skip.last_step_skipped
    assert not skip.state and all(torch.equal(p.detach(), w) for p, w in zip(ps, before))
    ps[0].grad[1, 2] = 0.0
    skip.step()
    assert not skip.last_step_skipped and skip.state


def test_finite_check_does_not_overflow_on_large_values():
    from lit_cosmos.distributed import LocalComm

    big = torch.full((4, 4), 1e30)  # its 2-norm squared overflows float32, its entries do not
    assert LocalComm().all_finite([big, torch.ones(3)])
    assert not LocalComm().all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not LocalComm().all_finite([torch.tensor([float("-inf")])])


def test_sparse_gradient_raises():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = COSMOS([{"params": emb.parameters(), "algorithm": "adamw"}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


BAD_ARGS = [
    (dict(lr=-1.0), r"lr=-1.0 in the arguments:"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(lr_ratio=-0.1), "lr_ratio=-0.1"),
    (dict(gamma=-1), "gamma=-1"),
    (dict(eps=-1e-8), "eps=-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(betas=(1.0, 0.9)), r"beta1=1.0 \(betas=\(1.0, 0.9\)\) in the arguments:"),
    (dict(betas=(0.9, -0.1)), "beta2=-0.1"),
    (dict(betas=(0.9,)), r"betas=\(0.9,\)"),
    (dict(rank=-1), r"rank=-1 in the arguments:"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(ns_steps=-1), "ns_steps=-1"),
    (dict(update_interval=-2), r"update_interval=-2 in the arguments:"),
    (dict(power_iters=0), "power_iters=0"),
    (dict(ns_dtype="float16"), r"ns_dtype='float16' in the arguments:"),
    (dict(nesterov="yes"), "nesterov='yes'"),
    (dict(adamw_betas=(0.9, 1.5)), r"beta2=1.5 \(betas=\(0.9, 1.5\)\) in the arguments \(adamw_betas\):"),
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of .* got 'ignore'"),
    (dict(lr=torch.tensor(0.1)), "pass a float"),
    (dict(batch="yes"), "batch must be None, True or False, got 'yes'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS)
def test_invalid_hyperparameters_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        COSMOS(_params((3, 3)), **kwargs)


def test_invalid_groups_raise():
    w, b = _params((3, 3), (3,))
    with pytest.raises(ValueError, match=r"algorithm='sgd'"):
        COSMOS([{"params": [w], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match=r"'fc.bias' of shape \(3,\)"):
        COSMOS([{"params": [("fc.bias", b)], "algorithm": "cosmos"}])
    with pytest.raises(ValueError, match=r"rank=-3 in param group 'mine'"):
        COSMOS([{"params": [w], "algorithm": "cosmos", "rank": -3, "name": "mine"}])
    with pytest.raises(TypeError, match="param_group must be a dict"):
        COSMOS([w]).add_param_group([b])


# ------------------------------------------------------------------ state_dict and memory
def test_state_dict_lockstep_round_trip():
    shapes = [(8, 6), (8, 6), (5, 9), (6,)]
    ps = _params(*shapes, seed=18)
    ref = _clone(ps)
    kw = dict(rank=3, update_interval=2, ns_dtype="float32")
    opt, ref_opt = COSMOS(ps, **kw), COSMOS(ref, **kw)
    _run(ref_opt, ref, 20, seed=19)

    g = torch.Generator().manual_seed(19)

    def steps(o, params, k):
        for _ in range(k):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            o.step()

    steps(opt, ps, 10)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    fresh_opt = COSMOS(fresh, **kw)
    fresh_opt.load_state_dict(ckpt["opt"])
    steps(fresh_opt, fresh, 10)
    for p, q in zip(fresh, ref):
        assert torch.equal(p.detach(), q.detach())
    assert fresh_opt.param_groups[0]["update_interval"] == 2


def test_load_state_dict_keeps_betas_tuples():
    # torch.distributed.checkpoint's full-state load (FSDP2, broadcast from rank 0) turns tuples
    # into lists: the loaded groups must still be what add_param_group makes.
    ps = _params((6, 4), (4,), seed=21)
    opt = COSMOS(ps, rank=2)
    _run(opt, ps, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["betas"] = list(group["betas"])
    fresh = COSMOS(_clone(ps), rank=2)
    fresh.load_state_dict(sd)
    assert [g["betas"] for g in fresh.param_groups] == [g["betas"] for g in opt.param_groups]
    assert all(type(g["betas"]) is tuple for g in fresh.param_groups)


def test_state_memory_equals_formula():
    shapes = [(12, 8), (8, 12), (4, 30), (3, 3), (10,), (2, 3, 4)]
    ps = _params(*shapes, seed=20)
    rank = 5
    groups = [
        {"params": ps[:4], "algorithm": "cosmos"},
        {"params": ps[4:], "algorithm": "adamw"},
    ]
    opt = COSMOS(groups, rank=rank)
    _run(opt, ps, 1)
    for p, shape in zip(ps[:4], shapes[:4]):
        m, n = shape
        r = min(rank, m, n)
        assert state_numel(opt.state[p]) == m * n + m * r + n * r + r * r == formula_numel(shape, "cosmos", rank)
        assert set(opt.state[p]) == {"step", "M", "U", "S", "V"}
    for p in ps[4:]:
        assert state_numel(opt.state[p]) == 2 * p.numel()
    expected = sum(formula_numel(s, "cosmos", rank, matrix=len(s) == 2) for s in shapes) * 4
    assert optimizer_state_bytes(opt, include_step=False) == expected
    assert optimizer_state_bytes(opt) == expected + 4 * len(ps)


def test_first_step_basis_is_top_eigenvectors_of_gram():
    (p,) = _params((20, 10), seed=21)
    opt = COSMOS([p], rank=3)
    G = torch.randn(20, 10, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    G = G @ torch.diag(torch.linspace(5, 0.1, 10, dtype=torch.float64))
    p.grad = G.float()
    opt.step()
    U = opt.state[p]["U"].double()
    want = F.top_eigenvectors(G.mT @ G, 3)
    torch.testing.assert_close(U @ U.mT, want @ want.mT, atol=1e-5, rtol=0)
    torch.testing.assert_close(opt.state[p]["S"].double(), 0.05 * want.mT @ G.mT @ G @ want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_newton_schulz_matches_eager():
    ps = _params((16, 12), seed=22)
    ref = _clone(ps)
    a = COSMOS(ps, rank=4, compile=True, ns_dtype="float32")
    b = COSMOS(ref, rank=4, ns_dtype="float32")
    _run(a, ps, 2)
    _run(b, ref, 2)
    torch.testing.assert_close(ps[0], ref[0], atol=1e-5, rtol=0)


def test_rms_scale_is_sqrt_mn():
    assert F.update_scale(4, 9) == math.sqrt(36)


def test_memory_report_counts_muon_and_plain_groups_as_matrices():
    from lit_cosmos import memory_report

    w, b = _params((6, 4), (4,))
    want = {"cosmos": (24 + 6 * 2 + 4 * 2 + 4) + 8, "adamw": 48 + 8, "muon": 24 + 8, "soap": 2 * 24 + 2 * 36 + 2 * 16 + 8}
    want = {k: 4 * v for k, v in want.items()}
    assert memory_report([{"params": [w, b]}], rank=2) == want
    assert memory_report([{"params": [w], "algorithm": "muon"}, {"params": [b], "algorithm": "adamw"}], rank=2) == want


def _stepped(shapes, rank=2, **kw):
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = COSMOS(params, rank=rank, **kw)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    return params, opt


@pytest.mark.parametrize(
    "saved_shapes, saved_rank, shapes, rank, match",
    [
        ([(6, 4)], 2, [(5, 4)], 2, r"parameter 0 of param group 0 \(cosmos, parameter shape \(5, 4\)\) has saved 'M' of shape \(6, 4\), expected \(5, 4\)"),
        ([(6, 4), (3,)], 2, [(6, 4), (4,)], 2, r"parameter 1 of param group 1 \(adamw, parameter shape \(4,\)\) has saved 'exp_avg' of shape \(3,\)"),
        ([(6, 5)], 3, [(6, 4)], 3, r"saved 'M' of shape \(6, 5\)"),
    ],
)
def test_loading_a_state_of_another_model_raises_and_loads_nothing(saved_shapes, saved_rank, shapes, rank, match):
    _, saved = _stepped(saved_shapes, rank=saved_rank)
    params, opt = _stepped(shapes, rank=rank)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        assert all(torch.equal(v, after["state"][k][key]) for key, v in st.items())


def test_loading_a_basis_wider_than_the_matrix_raises():
    _, opt = _stepped([(6, 4)], rank=2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["U"] = torch.zeros(4, 5)  # r = 5 > min(m, n) = 4
    sd["state"][0]["S"] = torch.zeros(5, 5)
    sd["state"][0]["V"] = torch.zeros(6, 5)
    with pytest.raises(ValueError, match=r"saved 'U' of shape \(4, 5\), expected \(n, r\) = \(4, r\) with r <= min\(m, n\) = 4"):
        opt.load_state_dict(sd)


def test_loading_a_state_of_another_rank_warns_and_keeps_the_saved_rank():
    params, saved = _stepped([(6, 4)], rank=3)
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    opt = COSMOS(fresh, rank=2)
    with pytest.warns(UserWarning, match=r"param group 0 has rank=2, the loaded state rank=3; the loaded rank"):
        opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["rank"] == 3 and opt.state[fresh[0]]["U"].shape == (4, 3)


def test_nonfinite_error_names_the_parameter_by_position():
    # plain tensors, the bad one not first, shapes that make tensor comparison fail
    w1, w2 = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(5, 3))
    opt = COSMOS([w1, w2])
    w1.grad, w2.grad = torch.randn(8, 4), torch.randn(5, 3)
    w2.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"parameter #1 of param group 0 of shape \(5, 3\)"):
        opt.step()


def test_float64_gradients_are_checked_in_float64():
    w = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = COSMOS([w], rank=2, ns_dtype="float32", lr=1e-3)
    w.grad = torch.full((4, 3), 1e150, dtype=torch.float64)  # finite, but its float32 sum is inf
    opt.step()
    assert torch.isfinite(w).all() and opt.state[w]["step"] == 1


def test_complex_parameters_and_sets_are_refused():
    with pytest.raises(ValueError, match=r"complex parameters: parameter of shape \(2, 2\) has dtype torch.complex64"):
        COSMOS([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="not a set"):
        COSMOS([{"params": {nn.Parameter(torch.zeros(2, 2))}, "algorithm": "cosmos"}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_keeps_the_float32_state_of_low_precision_parameters_exactly(dtype):
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(32, 16, dtype=dtype)), nn.Parameter(torch.randn(32, dtype=dtype))
    opt = COSMOS([w, b], lr=1e-2, rank=4)
    for _ in range(5):
        w.grad, b.grad = (torch.randn(32, 16) * 1e-4).to(dtype), (torch.randn(32) * 1e-4).to(dtype)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = COSMOS([w2, b2], lr=1e-2, rank=4)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in ((w, w2), (b, b2)):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype
            assert torch.equal(opt2.state[q][key], value), key  # not rounded through the parameter's dtype
    # and both continue identically
    for o, (pw, pb) in ((opt, (w, b)), (opt2, (w2, b2))):
        g = torch.Generator().manual_seed(7)
        pw.grad = (torch.randn(32, 16, generator=g) * 1e-4).to(dtype)
        pb.grad = (torch.randn(32, generator=g) * 1e-4).to(dtype)
        o.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_copies_keep_the_optimizer_settings(clone):
    import pickle

    w = nn.Parameter(torch.randn(6, 4))
    opt = COSMOS([w], rank=2, on_nonfinite="skip", batch=True, adamw_betas=(0.8, 0.85), comm="local")
    w.grad = torch.randn(6, 4)
    opt.step()
    opt.request_refresh(3)
    copied = copy.deepcopy(opt) if clone == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert (copied.on_nonfinite, copied.batch, copied._adamw_betas, copied._comm_spec) == ("skip", True, (0.8, 0.85), "local")
    assert copied._refresh_request == 3 and type(copied._comm).__name__ == "LocalComm"
    b = nn.Parameter(torch.randn(3))
    copied.add_param_group({"params": [b], "algorithm": "adamw"})  # needs the AdamW betas
    assert copied.param_groups[-1]["betas"] == (0.8, 0.85)
    (p,) = copied.param_groups[0]["params"]
    p.grad = torch.full((6, 4), float("nan"))
    copied.step()  # "skip": no error
    assert copied.last_step_skipped


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
def test_first_step_of_a_one_row_matrix_is_the_normalised_gradient(ns_dtype):
    # r = m = 1: U is g/|g|, the residual is zero but for roundoff (no Muon part), and in exact
    # arithmetic the update is -lr * lr_ratio * sqrt(n) * g / |g| (RMS lr * lr_ratio).
    n, lr, lr_ratio = 300, 0.01, 0.2
    w = nn.Parameter(torch.zeros(1, n))
    opt = COSMOS([w], lr=lr, lr_ratio=lr_ratio, rank=64, weight_decay=0.0, ns_dtype=ns_dtype)
    g = torch.randn(1, n, generator=torch.Generator().manual_seed(3))
    w.grad = g.clone()
    opt.step()
    want = -lr * lr_ratio * math.sqrt(n) * g.double() / g.double().norm()
    # U = g/|g| comes out of a float32 eigh of the n x n rank-1 g^T g, whose gap is its whole
    # norm: the eigenvector is accurate to ~n u as a vector (not entrywise: small entries of g
    # carry its absolute error), and the two normalisations add a few u. An O(gamma) Muon part
    # made of blown-up roundoff would be ~0.2.
    assert rel_err(w.detach(), want) < 2 * n * U32


@pytest.mark.parametrize("rank", [8, 64])
def test_rank_deficient_gradients_give_the_exact_arithmetic_update(rank):
    # A batch of 8 gives a rank-8 gradient: with rank >= 8 the basis holds its whole row space
    # plus arbitrary null directions, and the residual is roundoff. The float32 update must equal
    # the float64 one (the same rule at float64 roundoff) and stay in the gradient's row space.
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(64, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 48, generator=g, dtype=torch.float64)
    updates = {}
    for dtype in (torch.float64, torch.float32):
        w = nn.Parameter(torch.zeros(64, 48, dtype=dtype))
        opt = COSMOS([w], rank=rank, weight_decay=0.0, ns_dtype="float32")
        w.grad = grad.to(dtype)
        opt.step()
        updates[dtype] = w.detach().double()
    torch.testing.assert_close(updates[torch.float32], updates[torch.float64], rtol=1e-4, atol=1e-7)
    row_space = torch.linalg.svd(grad)[2][:8].T
    u = updates[torch.float32]
    assert ((u @ row_space).norm() / u.norm()).item() == pytest.approx(1.0, abs=1e-6)
