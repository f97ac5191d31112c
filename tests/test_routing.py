import pytest
import torch
from torch import nn

from lit_cosmos import COSMOS, cosmos_param_groups, routing_summary


class TinyLM(nn.Module):
    def __init__(self, tied=False, vocab=11, d=8):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(6, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=nn.LayerNorm(d), attn=nn.Linear(d, 3 * d, bias=False), proj=nn.Linear(3 * d, d)))
            for _ in range(2)
        )
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(()))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok_embeddings.weight
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)


def _names(groups):
    return {g["name"]: sorted(n for n, _ in g["params"]) for g in groups}


def test_default_routing():
    groups = cosmos_param_groups(TinyLM())
    names = _names(groups)
    assert names["cosmos"] == sorted(f"blocks.{i}.{k}.weight" for i in range(2) for k in ("attn", "proj"))
    assert names["adamw"] == ["conv.weight", "lm_head.weight", "pos.weight", "tok_embeddings.weight"]
    assert "norm.weight" in names["adamw_no_decay"] and "scale" in names["adamw_no_decay"]
    assert "blocks.0.proj.bias" in names["adamw_no_decay"] and "conv.bias" in names["adamw_no_decay"]
    assert not any("frozen" in n for ns in names.values() for n in ns)
    assert next(g for g in groups if g["name"] == "adamw_no_decay")["weight_decay"] == 0.0
    assert [g["algorithm"] for g in groups] == ["cosmos", "adamw", "adamw"]


def test_tied_head_is_routed_once_to_adamw():
    model = TinyLM(tied=True)
    names = _names(cosmos_param_groups(model))
    assert "lm_head.weight" not in sum(names.values(), [])
    assert "tok_embeddings.weight" in names["adamw"]


def test_overrides_options_and_conv():
    groups = cosmos_param_groups(TinyLM(), overrides={"blocks.1.*.weight": "adamw", "lm_head.weight": "cosmos"}, conv="cosmos", rank=3)
    names = _names(groups)
    assert names["cosmos"] == ["blocks.0.attn.weight", "blocks.0.proj.weight", "conv.weight", "lm_head.weight"]
    assert "blocks.1.attn.weight" in names["adamw"]
    assert all(g["rank"] == 3 for g in groups)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(overrides={"nothing.*": "adamw"}), r"matched no trainable parameter: \['nothing.\*'\]"),
        (dict(overrides={"norm.weight": "cosmos"}), r"'norm.weight' of shape \(8,\) cannot be routed to cosmos"),
        (dict(overrides={"norm.weight": "sgd"}), r"'norm.weight' -> 'sgd'"),
        (dict(conv="muon"), "conv must be 'adamw' or 'cosmos', got 'muon'"),
        (dict(head_names="lm_head"), r"head_names must be a sequence of attribute names .* got 'lm_head'"),
    ],
)
def test_routing_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cosmos_param_groups(TinyLM(), **kwargs)


def test_every_trainable_parameter_in_exactly_one_group_and_optimizer_accepts_names():
    model = TinyLM(tied=True)
    groups = cosmos_param_groups(model)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    opt = COSMOS(groups)
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == "blocks.0.attn.weight"
    # torch optimizers take the same groups (extra keys are kept, unused)
    torch.optim.AdamW(cosmos_param_groups(model))


def test_summary_lists_counts_and_shapes():
    text = routing_summary(cosmos_param_groups(TinyLM()))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["group", "algorithm", "tensors", "elements"]
    cosmos = next(line for line in lines if line.startswith("cosmos"))
    assert cosmos.split()[1:4] == ["cosmos", "4", str(2 * (8 * 24 + 24 * 8))]
    assert "24x8 (2)" in cosmos and "8x24 (2)" in cosmos


def test_optimizer_side_imports_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import torch, lit_cosmos\n"
        "from lit_cosmos import COSMOS, cosmos_param_groups, memory_report, MuonAdamW\n"
        "m = torch.nn.Linear(4, 3); opt = COSMOS(cosmos_param_groups(m)); m(torch.ones(2, 4)).sum().backward(); opt.step()\n"
        "assert 'lightning' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None}\n"
        "try:\n    lit_cosmos.CosmosMixin\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
