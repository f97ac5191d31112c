"""MuonAdamW against its references: torch.optim.Muon and torch.optim.AdamW, step for step."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lit_cosmos import MuonAdamW, cosmos_param_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)


def _net(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt, model, steps, start=0):
    for s in range(start, start + steps):
        _grads(model, s)
        opt.step()


def _params_by_name(model):
    return dict(model.named_parameters())


MUON_NAMES = ("fc1.weight", "fc2.weight")


def _references(model, lr=2e-3, wd=0.1, **muon_kw):
    """Standalone torch optimizers over the same routing as cosmos_param_groups gives."""
    named = _params_by_name(model)
    decay = [named["embed.weight"], named["head.weight"]]
    no_decay = [named[n] for n in ("fc1.bias", "fc2.bias", "norm.weight", "norm.bias")]
    muon = torch.optim.Muon([named[n] for n in MUON_NAMES], lr=muon_kw.pop("muon_lr", lr), weight_decay=wd,
                            momentum=0.95, nesterov=True, adjust_lr_fn=muon_kw.pop("adjust_lr_fn", "match_rms_adamw"))
    adamw = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    return muon, adamw


@pytest.mark.parametrize("kw", [{}, {"muon_lr": 0.02, "adjust_lr_fn": "original"}])
def test_equals_torch_muon_and_adamw_step_for_step(kw):
    ours, ref = _net(), _net()
    opt = MuonAdamW(cosmos_param_groups(ours), lr=3e-3, **kw)
    muon, adamw = _references(ref, lr=3e-3, **dict(kw))
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw", "adamw"]
    for s in range(6):
        _grads(ours, s)
        _grads(ref, s)
        opt.step()
        muon.step()
        adamw.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (s, name)


@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (96, 96)])
def test_default_matrix_update_rms_is_near_cosmos(shape):
    """match_rms_adamw: per-entry update RMS ~0.17 lr (COSMOS: exactly lr_ratio * lr = 0.2 lr)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    start = w.detach().clone()
    opt = MuonAdamW([w], lr=1e-2, weight_decay=0.0)
    w.grad = torch.randn(shape)
    opt.step()
    rms = (w - start).square().mean().sqrt().item() / 1e-2
    assert 0.14 < rms < 0.2, rms


def test_lr_scheduler_on_the_outer_drives_both_algorithms():
    ours, ref = _net(), _net()
    opt = MuonAdamW(cosmos_param_groups(ours))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    muon, adamw = _references(ref)
    refs = [muon, adamw]
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in refs]
    for s in range(4):
        _grads(ours, s)
        _grads(ref, s)
        opt.step()
        sched.step()
        for o, sc in zip(refs, ref_scheds):
            o.step()
            sc.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 5)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_continues_exactly():
    full = _net()
    opt_full = MuonAdamW(cosmos_param_groups(full), lr=5e-3)
    _run(opt_full, full, 10)

    first = _net()
    opt_first = MuonAdamW(cosmos_param_groups(first), lr=5e-3)
    _run(opt_first, first, 5)
    saved_params = _roundtrip(first.state_dict())
    saved_opt = _roundtrip(opt_first.state_dict())

    resumed = _net(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_params)
    opt_resumed = MuonAdamW(cosmos_param_groups(resumed), lr=1.0)  # lr too comes from the checkpoint
    opt_resumed.load_state_dict(saved_opt)
    assert opt_resumed.param_groups[0]["lr"] == 5e-3
    _run(opt_resumed, resumed, 5, start=5)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert opt_resumed.state_dict()["state"].keys() == opt_full.state_dict()["state"].keys()


def test_loaded_groups_are_the_ones_stepped():
    """load_state_dict replaces the group dicts: the inner optimizers must follow them."""
    model = _net()
    opt = MuonAdamW(cosmos_param_groups(model))
    _run(opt, model, 2)
    opt.load_state_dict(opt.state_dict())
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _run(opt, model, 1, start=2)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_step_like_the_original(clone):
    model = _net()
    opt = MuonAdamW(cosmos_param_groups(model))
    _run(opt, model, 2)
    pair = clone((model, opt))
    _run(opt, model, 2, start=2)
    _run(pair[1], pair[0], 2, start=2)
    for p, q in zip(model.parameters(), pair[0].parameters()):
        assert torch.equal(p, q)


def test_plain_parameters_split_by_dimension():
    model = _net()
    opt = MuonAdamW(model.parameters())
    algs = {tuple(p.shape): g["algorithm"] for g in opt.param_groups for p in g["params"]}
    assert algs[(12, 8)] == "muon" and algs[(16, 8)] == "muon" and algs[(12,)] == "adamw"


def test_group_options_win_and_muon_group_keys():
    model = _net()
    groups = cosmos_param_groups(model)
    groups[0]["lr"] = 0.05
    opt = MuonAdamW(groups, lr=1e-3, ns_steps=3)
    muon, adamw, no_decay = opt.param_groups
    assert (muon["lr"], muon["ns_steps"], muon["eps"], muon["name"]) == (0.05, 3, 1e-7, "cosmos")
    assert (adamw["lr"], adamw["betas"], adamw["eps"]) == (1e-3, (0.9, 0.95), 1e-8)
    assert no_decay["weight_decay"] == 0.0


def test_add_param_group_later():
    model = _net()
    frozen = nn.Linear(4, 4)
    opt = MuonAdamW(cosmos_param_groups(model))
    opt.add_param_group({"params": [("late.weight", frozen.weight)], "algorithm": "muon"})
    opt.add_param_group({"params": [("late.bias", frozen.bias)], "algorithm": "adamw"})
    frozen.weight.grad = torch.ones(4, 4)
    frozen.bias.grad = torch.ones(4)
    before = frozen.weight.detach().clone(), frozen.bias.detach().clone()
    opt.step()
    assert not torch.equal(frozen.weight, before[0]) and not torch.equal(frozen.bias, before[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, r"invalid lr=-1.0"),
        ({"muon_lr": -0.1}, r"invalid muon_lr=-0.1"),
        ({"momentum": 1.0}, r"invalid momentum=1.0"),
        ({"ns_steps": -1}, r"invalid ns_steps=-1"),
        ({"ns_eps": float("nan")}, r"invalid ns_eps=nan"),
        ({"weight_decay": -0.1}, r"invalid weight_decay=-0.1"),
        ({"adamw_betas": (0.9, 1.0)}, r"invalid beta2=1.0"),
        ({"adjust_lr_fn": "bogus"}, r"invalid adjust_lr_fn='bogus'"),
        ({"nesterov": 1}, r"invalid nesterov=1"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuonAdamW(cosmos_param_groups(_net()), **kwargs)


def test_bad_groups_raise():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"Muon needs 2-D matrices: parameter 'weight' of shape \(3, 2, 3, 3\)"):
        MuonAdamW(cosmos_param_groups(conv, conv="cosmos"))
    with pytest.raises(ValueError, match=r"invalid algorithm='sgd'"):
        MuonAdamW([{"params": [conv.bias], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match=r"invalid lr=-2 in param group 'x'"):
        MuonAdamW([{"params": [conv.bias], "algorithm": "adamw", "lr": -2, "name": "x"}])
    with pytest.raises(ValueError, match="empty parameter list"):
        MuonAdamW([])


def _fsdp_refused_worker(rank, world, port):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    replicated = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    MuonAdamW([replicated])  # replicated matrices are whole on every rank: accepted
    with pytest.raises(ValueError, match=r"parameter 'w' of shape \(4, 3\).*sharded as \(Shard\(dim=0\),\).*COSMOS"):
        MuonAdamW([{"params": [("w", sharded)], "algorithm": "muon"}])
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_row_shards_are_refused_with_a_clear_error():
    # torch.optim.Muon on a row shard would orthogonalise the shard, not the matrix (and fails
    # deep inside DTensor dispatch); MuonAdamW says so at construction.
    from zoo.launch import spawn

    spawn(_fsdp_refused_worker, 1)


def test_loading_a_state_of_another_model_raises_and_loads_nothing():
    def stepped(shape):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(shape))
        opt = MuonAdamW([{"params": [p], "algorithm": "muon"}], lr=1e-2)
        p.grad = torch.randn(shape)
        opt.step()
        return p, opt

    _, saved = stepped((6, 4))
    p, opt = stepped((5, 4))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 has shape \(5, 4\) but its saved "
                                         r"'momentum_buffer' has shape \(6, 4\)"):
        opt.load_state_dict(saved.state_dict())
    assert torch.equal(opt.state[p]["momentum_buffer"], before["state"][0]["momentum_buffer"])
