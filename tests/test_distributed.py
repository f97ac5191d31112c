"""COSMOS across 2 processes (gloo, CPU): FSDP2 row shards and DDP work split equal one process."""

import contextlib
import faulthandler
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _numerics import SAFETY, U32, cosmos_twin, newton_schulz_twin, twin_deviation, use_newton_schulz
from torch import nn

from lit_cosmos import COSMOS
from lit_cosmos.distributed import assign_owners, row_layout
from zoo.launch import spawn

pytestmark = pytest.mark.distributed

WORLD = 2
# (6, 4) twice: a stacked bucket; (5, 7): uneven shards 3 + 2; (1, 6): an empty shard on rank 1;
# (3, 12) wide and rank > rows; (12, 3): rank clipped by columns.
SHAPES = [(6, 4), (6, 4), (5, 7), (1, 6), (3, 12), (12, 3)]
KW = dict(lr=1e-2, rank=2, ns_dtype="float32", weight_decay=0.1, update_interval=2)


def _spawn(fn, *args, world=WORLD):
    spawn(fn, world, *args)


def _init(rank, world, port):
    faulthandler.enable(all_threads=True)  # a crash in a worker prints its Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES] + [torch.randn(5, generator=g)]


def _initial():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES] + [torch.randn(5, generator=g)]


def _groups(params):
    return [{"params": params[:-1], "algorithm": "cosmos"}, {"params": params[-1:], "algorithm": "adamw"}]


def _reference(steps):
    params = [nn.Parameter(t.clone()) for t in _initial()]
    opt = COSMOS(_groups(params), **KW)
    for s in range(steps):
        for p, g in zip(params, _grads(s)):
            p.grad = g
        opt.step()
    return params, opt


def _rounding_tolerances(steps):
    """Entrywise bounds for two float32 runs of ``_reference(steps)`` that round differently
    (sums over row shards vs over whole matrices): each is within SAFETY times its float64
    twin's deviation of exact arithmetic (tests/_numerics.py), so the two within twice that.
    Returns the bounds of the parameters and of the matrices' basis projectors ``U U^T``."""

    def run(rounding):
        params, opt = cosmos_twin(_initial(), [_grads(s) for s in range(steps)], rounding, groups=_groups, **KW)
        return params + [opt.state[p]["U"] @ opt.state[p]["U"].mT for p in params[:-1]]

    tol = [2 * SAFETY * t for t in twin_deviation(run)]
    return tol[: len(SHAPES) + 1], tol[len(SHAPES) + 1 :]


# ---------------------------------------------------------------------------- FSDP2 (DTensor)
def _fsdp_worker(rank, world, port, param_tol, basis_tol):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in _initial()]
    opt = COSMOS(_groups(params), batch=True, **KW)  # stacks through gather/scatter too
    assert type(opt._comm).__name__ == "FSDPComm"
    steps = 5
    for s in range(steps):
        for p, g in zip(params, _grads(s)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    ref, ref_opt = _reference(steps)
    for p, q, tol in zip(params, ref, param_tol):
        torch.testing.assert_close(p.full_tensor(), q.detach(), atol=tol, rtol=0)

    for i, (p, shape) in enumerate(zip(params[:-1], SHAPES)):
        st = opt.state[p]
        m, n = shape
        r = min(KW["rank"], m, n)
        rows = row_layout(m, world)[rank]
        # M and V sharded by rows, U and S replicated: (mn + mr)/P + nr + r^2 per rank
        local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in st.items()}
        assert local["M"].shape == (rows, n) and local["V"].shape == (rows, r)
        assert sum(local[k].numel() for k in "MUSV") == rows * n + rows * r + n * r + r * r
        # U and S bitwise identical on all ranks
        for key in ("U", "S"):
            mine = local[key].contiguous()
            other = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(other, mine)
            assert all(torch.equal(o, mine) for o in other)
        U_ref = ref_opt.state[ref[i]]["U"]  # same span; column signs may differ
        torch.testing.assert_close(local["U"] @ local["U"].mT, U_ref @ U_ref.mT, atol=basis_tol[i], rtol=0)
    dist.destroy_process_group()


def test_fsdp2_row_shards_equal_whole_matrices():
    _spawn(_fsdp_worker, *_rounding_tolerances(steps=5))


def _fsdp_bad_placement_worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        COSMOS([p])
    except ValueError as e:
        assert "placements (Shard(0),)" in str(e) and "Shard(dim=1)" in str(e), str(e)
    else:
        raise AssertionError("Shard(1) was accepted")
    dist.destroy_process_group()


def test_fsdp2_column_shards_raise_clear_error():
    _spawn(_fsdp_bad_placement_worker)


# ---------------------------------------------------------------------------- FSDP2 + DCP resume
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 5, bias=False)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 1, bias=False)  # 1 row: an empty shard on rank 1

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _net_step(net, opt, s):
    g = torch.Generator().manual_seed(200 + s)
    x = torch.randn(4, 7, generator=g)
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _fsdp_ckpt_worker(rank, world, port, ckpt_dir, full):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))

    def build():
        torch.manual_seed(0)
        net = _Net()
        fully_shard(net, mesh=mesh)
        return net, COSMOS(net.parameters(), lr=1e-2, rank=2, ns_dtype="float32")

    net, opt = build()
    for s in range(6):
        _net_step(net, opt, s)
    want = {k: v.full_tensor() for k, v in net.state_dict().items()}
    if rank == 0:
        torch.save(want, os.path.join(ckpt_dir, "..", f"want_{int(full)}.pt"))

    net, opt = build()
    for s in range(3):
        _net_step(net, opt, s)
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    state = {"model": get_model_state_dict(net, options=options), "optim": get_optimizer_state_dict(net, opt, options=options)}
    if full:
        if rank == 0:
            torch.save(state, os.path.join(ckpt_dir, "full.pt"))
        dist.barrier()
    else:
        dcp.save(state, checkpoint_id=ckpt_dir)

    net, opt = build()
    params_before = {k: v.full_tensor().clone() for k, v in net.state_dict().items()}
    if full:
        loaded = torch.load(os.path.join(ckpt_dir, "full.pt"), weights_only=True)
        set_model_state_dict(net, loaded["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(net, opt, loaded["optim"], options=StateDictOptions(full_state_dict=True))
    else:
        # DCP loading first materialises the state with a zero-gradient, lr-0 step.
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(opt)
        after_init = {k: v.full_tensor() for k, v in net.state_dict().items()}
        assert all(torch.equal(after_init[k], params_before[k]) for k in after_init)
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(net, state["model"])
        set_optimizer_state_dict(net, opt, state["optim"])
    for s in range(3, 6):
        _net_step(net, opt, s)
    got = {k: v.full_tensor() for k, v in net.state_dict().items()}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    dist.destroy_process_group()


def _net_rounding_tolerances(steps):
    """Entrywise bounds for two float32 runs of ``_net_step`` that round differently, as in
    :func:`_rounding_tolerances`, from float64 twins of forward, backward and step."""

    def run(rounding):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = _Net().double()
        if rounding is not None:
            for p in net.parameters():
                rounding.perturb(p.data, U32)
        opt = COSMOS(net.parameters(), lr=1e-2, rank=2, ns_dtype="float32")
        use_newton_schulz(opt, newton_schulz_twin(rounding))
        for s in range(steps):
            x = torch.randn(4, 7, generator=torch.Generator().manual_seed(200 + s)).double()
            if rounding is not None:
                rounding.perturb(x, U32)
            with rounding if rounding is not None else contextlib.nullcontext():
                net(x).square().mean().backward()
                opt.step()
            opt.zero_grad()
        return [v.detach().clone() for v in net.state_dict().values()]

    with torch.random.fork_rng():
        torch.manual_seed(0)
        names = list(_Net().state_dict())
    return dict(zip(names, (2 * SAFETY * t for t in twin_deviation(run))))


def _fsdp_one_process_resume_worker(rank, world, port, ckpt_dir, tol):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port)
    torch.manual_seed(0)
    net = _Net()
    fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    opt = COSMOS(net.parameters(), lr=1e-2, rank=2, ns_dtype="float32")
    state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)  # written by 2 ranks, read by 1: DCP reshards
    net.load_state_dict(state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    for s in range(3, 6):
        _net_step(net, opt, s)
    want = torch.load(os.path.join(ckpt_dir, "..", "want_0.pt"), weights_only=True)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v.full_tensor(), want[k], atol=tol[k], rtol=0)
    dist.destroy_process_group()


@pytest.mark.parametrize("full", [False, True], ids=["dcp", "full_file"])
def test_fsdp2_checkpoint_resume_is_exact(tmp_path, full):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _spawn(_fsdp_ckpt_worker, str(ckpt), full)
    if not full:
        # The same sharded checkpoint resumed by ONE process continues the same trajectory
        # (up to float rounding: the sums over row shards are now sums over one shard).
        _spawn(_fsdp_one_process_resume_worker, str(ckpt), _net_rounding_tolerances(steps=6), world=1)


# ---------------------------------------------------------------------------- DDP work split
def _ddp_split_worker(rank, world, port, ckpt):
    _init(rank, world, port)
    params = [nn.Parameter(t.clone()) for t in _initial()]
    opt = COSMOS(_groups(params), comm="ddp_split", **KW)
    for s in range(3):
        for p, g in zip(params, _grads(s)):
            p.grad = g.clone()
        opt.step()
    owned = [p for p in params[:-1] if p in opt.state]
    assert 0 < len(owned) < len(SHAPES)  # state of a matrix lives on its owner only
    sd = opt.state_dict()  # consolidates: complete on every rank
    assert len(sd["state"]) == len(params)
    assert len([p for p in params[:-1] if p in opt.state]) == len(owned)  # and freed again
    if rank == 0:
        torch.save({"opt": sd, "params": [p.detach() for p in params]}, ckpt)
    dist.barrier()
    loaded = torch.load(ckpt, weights_only=True)
    fresh = [nn.Parameter(t.clone()) for t in loaded["params"]]
    fresh_opt = COSMOS(_groups(fresh), comm="ddp_split", **KW)
    fresh_opt.load_state_dict(loaded["opt"])
    for s in range(3, 6):
        for p, q, g in zip(params, fresh, _grads(s)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        fresh_opt.step()
    ref, _ = _reference(6)
    for p, q, r in zip(params, fresh, ref):
        torch.testing.assert_close(p.detach(), r.detach(), atol=1e-6, rtol=0)
        assert torch.equal(p.detach(), q.detach())
    # identical on both ranks
    for p in params:
        other = [torch.empty_like(p.detach()) for _ in range(world)]
        dist.all_gather(other, p.detach().contiguous())
        assert torch.equal(other[0], other[1])
    dist.destroy_process_group()


def test_ddp_work_split_equals_one_process_and_resumes(tmp_path):
    _spawn(_ddp_split_worker, str(tmp_path / "ddp.pt"))


# ---------------------------------------------------------------------------- pure helpers
def test_assign_owners_balances_and_is_deterministic():
    costs = [100, 90, 50, 40, 30, 5]
    owners = assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert owners == assign_owners(costs, 2)
    # largest first to the least-loaded rank (ties to the lower rank): 100,40,30 | 90,50,5
    assert owners == [0, 1, 1, 0, 0, 1] and load == [170, 145]


@pytest.mark.parametrize("m,world,want", [(5, 2, [3, 2]), (1, 2, [1, 0]), (6, 4, [2, 2, 2, 0]), (0, 2, [0, 0])])
def test_row_layout_is_torch_chunk(m, world, want):
    assert row_layout(m, world) == want
    if m:
        assert [len(c) for c in torch.arange(m).chunk(world)] + [0] * (world - math.ceil(m / math.ceil(m / world))) == want


def test_ddp_split_rejects_dtensors_and_bad_comm():
    with pytest.raises(ValueError, match="comm must be a lit_cosmos.distributed.Comm or one of .* got 'nccl'"):
        COSMOS([nn.Parameter(torch.randn(3, 3))], comm="nccl")


# ---------------------------------------------------------------------------- expert stacks
# (3, 4, 5): experts 2 + 1; (1, 4, 6): rank 1 holds no expert; (2, 6, 3): rank clipped by n.
STACKS = [(3, 4, 5), (1, 4, 6), (2, 6, 3)]
STACK_KW = dict(lr=3e-2, rank=2, ns_dtype="float32", weight_decay=0.1, update_interval=2)


def _stack_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in STACKS + [(6, 5)]]


def _stack_groups(params):
    return [{"params": params[:-1], "algorithm": "cosmos", "matrix_layout": "stack"},
            {"params": params[-1:], "algorithm": "cosmos"}]


def _stack_reference(steps):
    params = [nn.Parameter(t.clone()) for t in _stack_tensors(0)]
    opt = COSMOS(_stack_groups(params), **STACK_KW)
    for s in range(steps):
        for p, g in zip(params, _stack_tensors(100 + s)):
            p.grad = g
        opt.step()
    return params


def _stack_worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, port)
    steps = 5
    ref = _stack_reference(steps)
    # FSDP2 shards a stack on its expert dimension: each rank steps whole local experts, and
    # their bases (U, S) are sharded with them. float64: the twin differs by roundoff only.
    mesh = init_device_mesh("cpu", (world,))
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in _stack_tensors(0)]
    opt = COSMOS(_stack_groups(params), batch=True, **STACK_KW)
    for s in range(steps):
        for p, g in zip(params, _stack_tensors(100 + s)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.full_tensor(), q.detach(), atol=1e-10, rtol=0)
    for p, (E, m, n) in zip(params[:-1], STACKS):
        r = min(STACK_KW["rank"], m, n)
        local_e = len(torch.arange(E).chunk(world)[rank]) if rank < len(torch.arange(E).chunk(world)) else 0
        local = {k: v.to_local() for k, v in opt.state[p].items() if k != "step"}
        assert {k: tuple(v.shape) for k, v in local.items()} == {
            "M": (local_e, m, n), "U": (local_e, n, r), "S": (local_e, r, r), "V": (local_e, m, r)}
    # The FSDP2 seam cannot take a weight whose matrix rows are not dim 0.
    t = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    for extra in ({"matrix_layout": "transposed"}, {"split": 2}):
        try:
            COSMOS([{"params": [t], "algorithm": "cosmos", **extra}])
        except ValueError as e:
            assert "fully_shard shards dim 0, which is not the rows of its matrix view" in str(e), str(e)
        else:
            raise AssertionError(f"{extra} was accepted for a DTensor")

    # DDP work split: a stack is one unit of work, owned by one rank.
    params = [nn.Parameter(t.clone()) for t in _stack_tensors(0)]
    opt = COSMOS(_stack_groups(params), comm="ddp_split", **STACK_KW)
    for s in range(steps):
        for p, g in zip(params, _stack_tensors(100 + s)):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-10, rtol=0)
    assert 0 < len(opt.state) < len(params)
    assert len(opt.state_dict()["state"]) == len(params)
    dist.destroy_process_group()


def test_expert_stacks_under_fsdp2_and_ddp_split_equal_one_process():
    _spawn(_stack_worker)
