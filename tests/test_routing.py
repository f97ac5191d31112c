import warnings

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
    overrides = {"blocks.1.*.weight": "adamw", "lm_head.weight": "cosmos"}
    groups = cosmos_param_groups(TinyLM(), overrides=overrides, conv="cosmos", rank=3)
    names = _names(groups)
    assert names["cosmos"] == ["blocks.0.attn.weight", "blocks.0.proj.weight", "lm_head.weight"]
    assert names["cosmos_flatten"] == ["conv.weight"]  # nn.Conv1d's (out, in, k): a convolution, not a stack
    assert "blocks.1.attn.weight" in names["adamw"]
    assert all(g["rank"] == 3 for g in groups)
    layouts = {g["name"]: (g["matrix_layout"], g["split"]) for g in groups if g["algorithm"] == "cosmos"}
    assert layouts == {"cosmos": ("linear", None), "cosmos_flatten": ("flatten", None)}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(overrides={"nothing.*": "adamw"}), r"matched no trainable parameter: \['nothing.\*'\]"),
        (dict(overrides={"norm.weight": "cosmos"}), r"'norm.weight' of shape \(8,\) cannot be routed to cosmos"),
        (dict(overrides={"norm.weight": "sgd"}), r"'norm.weight' -> 'sgd'"),
        (dict(conv="muon"), "conv must be 'adamw' or 'cosmos', got 'muon'"),
        (dict(head_names="lm_head"), r"head_names must be a sequence of attribute names .* got 'lm_head'"),
        (dict(stacks="muon"), "stacks must be 'adamw' or 'cosmos', got 'muon'"),
        (dict(overrides={"conv.weight": "cosmos_linear"}), r"'conv.weight' has shape \(8, 8, 3\), but 'linear' needs"),
        (dict(overrides={"lm_head.weight": "cosmos_stack"}), r"'lm_head.weight' has shape \(11, 8\), but 'stack'"),
        (dict(overrides={"conv.weight": "cosmos_flat"}), r"'conv.weight' -> 'cosmos_flat': route must be one of"),
        (dict(matrix_layout="stack"), "matrix_layout is set by the routing, not as a group option"),
        (dict(split={"blocks.*.attn.weight": 5}), r"'blocks.0.attn.weight' of shape \(24, 8\): its linear matrix has "
                                                  r"24 output rows, not divisible into 5 parts"),
        (dict(split={"blocks.*.attn.weight": (8, 8, 4)}), r"the row counts sum to 20, but its linear matrix has 24"),
        (dict(split={"blocks.*.attn.weight": 1}), r"'blocks.\*.attn.weight' -> 1: must be a number of equal parts"),
        (dict(split={"blocks.*.attn.weight": (24,)}), r"-> \(24,\): must be a number of equal parts >= 2, or a tuple"),
        (dict(split={"blocks.*.attn.weight": True}), r"-> True: must be a number"),
        (dict(split={"lm_head.weight": 11}), r"'lm_head.weight' of shape \(11, 8\) is routed to adamw; only COSMOS"),
        (dict(split={"nothing*": 2}), r"split patterns matched no trainable matrix: \['nothing\*'\]"),
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


def test_summary_lists_counts_shapes_the_head_and_the_notes():
    text = routing_summary(cosmos_param_groups(TinyLM(), split={"blocks.*.attn.weight": 3}))
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["group", "algorithm", "layout", "split", "tensors", "elements"]
    cosmos = next(line for line in lines if line.startswith("cosmos "))
    assert cosmos.split()[1:5] == ["cosmos", "linear", "-", "2"] and cosmos.split()[5] == str(2 * 24 * 8)
    split = next(line for line in lines if line.startswith("cosmos_split3 "))
    assert split.split()[1:5] == ["cosmos", "linear", "3", "2"] and "24x8 (2)" in split
    assert "head: lm_head.weight (output head by name 'lm_head')" in lines
    notes = lines[lines.index("notes:") + 1:]
    assert notes == [
        "  blocks.*.attn.weight (2)  split into 3 equal parts",
        "  conv.weight               convolution (Conv1d), conv='adamw'",
    ]


def test_summary_says_when_no_head_is_recognised():
    text = routing_summary(cosmos_param_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))))
    assert "head: none recognised" in text


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


# ---------------------------------------------------------------------- heads by structure
class VocabLM(nn.Module):
    """Token and position embeddings, a block list, and an untied head named ``head_name``."""

    def __init__(self, head_name="to_logits", vocab=13, d=8, positions=20, extra_vocab_maps=()):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(positions, d)  # more rows than the vocabulary: not the token embedding
        self.layers = nn.ModuleList([nn.ModuleDict(dict(up=nn.Linear(d, vocab), down=nn.Linear(vocab, d)))])
        setattr(self, head_name, nn.Linear(d, vocab))
        for name in extra_vocab_maps:
            setattr(self, name, nn.Linear(d, vocab, bias=False))


def _route_of(groups, name):
    return next(g["name"] for g in groups for n, _ in g["params"] if n == name)


@pytest.mark.parametrize("head_name", ["decoder", "to_logits", "unembed", "proj_out"])
def test_untied_head_of_any_name_maps_to_the_vocabulary(head_name):
    groups = cosmos_param_groups(VocabLM(head_name))
    # layers.0.up also maps to the vocabulary, but inside a repeated block: a hidden layer
    assert [_route_of(groups, n) for n in (f"{head_name}.weight", "layers.0.up.weight", "layers.0.down.weight")] == [
        "adamw", "cosmos", "cosmos"]
    assert _route_of(groups, f"{head_name}.bias") == "adamw_no_decay"
    assert (f"head: {head_name}.weight (output head by vocabulary: maps to the 13 rows of tok (the largest "
            "non-positional nn.Embedding))") in routing_summary(groups)


def test_overrides_win_over_the_vocabulary_rule_and_are_noted():
    groups = cosmos_param_groups(VocabLM("unembed"), overrides={"unembed.weight": "cosmos"})
    assert _route_of(groups, "unembed.weight") == "cosmos"
    assert ("head: unembed.weight (override 'unembed.weight' -> 'cosmos'; by default output head by vocabulary: "
            "maps to the 13 rows of tok") in routing_summary(groups)


def test_several_vocabulary_heads_warn_and_list_them():
    with pytest.warns(UserWarning, match=r"more than one weight was taken as the output head.*to_logits.weight "
                                         r"\(output head by vocabulary.*copy_logits.weight \(output head by "):
        groups = cosmos_param_groups(VocabLM(extra_vocab_maps=("copy_logits",)))
    assert _route_of(groups, "to_logits.weight") == _route_of(groups, "copy_logits.weight") == "adamw"
    # overriding the extra one resolves it: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cosmos_param_groups(VocabLM(extra_vocab_maps=("copy_logits",)), overrides={"copy_logits.weight": "cosmos"})


def test_raw_parameter_head_of_unknown_layout_and_head_name_on_a_parameter():
    class RawHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(13, 8)
            self.mix = nn.Linear(8, 8)
            self.unembed = nn.Parameter(torch.randn(8, 13))  # used as h @ unembed: stored (in, out)

    groups = cosmos_param_groups(RawHead())
    assert [_route_of(groups, n) for n in ("unembed", "mix.weight")] == ["adamw", "cosmos"]
    model = nn.Module()
    model.mix = nn.Linear(8, 8)
    model.lm_head = nn.Parameter(torch.randn(5, 8))  # a parameter named like a head, no embedding
    groups = cosmos_param_groups(model)
    assert [_route_of(groups, n) for n in ("lm_head", "mix.weight")] == ["adamw", "cosmos"]


def test_token_embedding_from_get_input_embeddings_and_no_embedding_no_vocabulary_rule():
    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(13, 8)
            self.big_table = nn.Embedding(50, 8)  # more rows, but not the input embedding
            self.proj = nn.Linear(8, 13)
            self.other = nn.Linear(8, 50)

        def get_input_embeddings(self):
            return self.words

    groups = cosmos_param_groups(HFStyle())
    assert [_route_of(groups, n) for n in ("proj.weight", "other.weight")] == ["adamw", "cosmos"]
    # a classifier: no embedding, so only the names mark the head (torchvision's "fc" is not one)
    cnn = nn.Sequential()
    cnn.add_module("features", nn.Conv2d(3, 4, 3))
    cnn.add_module("fc", nn.Linear(4, 10))
    cnn.add_module("classifier", nn.Linear(10, 10))
    groups = cosmos_param_groups(cnn)
    assert [_route_of(groups, n) for n in ("fc.weight", "classifier.weight", "features.weight")] == [
        "cosmos", "adamw", "adamw"]


# ---------------------------------------------------------------------- stacks, convolutions, layouts
class Experts(nn.Module):
    def __init__(self, e=4, d=8, i=6, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        shape_up, shape_down = ((e, d, 2 * i), (e, i, d)) if transposed else ((e, 2 * i, d), (e, d, i))
        self.gate_up_proj = nn.Parameter(torch.randn(shape_up))
        self.down_proj = nn.Parameter(torch.randn(shape_down))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))


class MoE(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = Experts(transposed=transposed)
        self.shared = nn.Linear(8, 8)


class Vision(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.conv1d = nn.Conv1d(8, 8, 3)
        self.conv2d = nn.Conv2d(3, 8, 3)
        self.moe = MoE()


def test_stacks_convolutions_and_tables_are_told_apart():
    groups = cosmos_param_groups(Vision())
    assert {n: (_route_of(groups, n)) for n, _ in Vision().named_parameters()} == {
        "pos_embed": "adamw",  # (1, n, d): a table, not a stack of matrices
        "conv1d.weight": "adamw", "conv1d.bias": "adamw_no_decay",  # nn.Conv1d is 3-D but a convolution
        "conv2d.weight": "adamw", "conv2d.bias": "adamw_no_decay",
        "moe.router.weight": "adamw",  # (E, d) next to the experts: the router
        "moe.experts.gate_up_proj": "cosmos_stack", "moe.experts.down_proj": "cosmos_stack",
        "moe.experts.gate_up_proj_bias": "adamw_no_decay",  # 2-D, but a bias
        "moe.shared.weight": "cosmos", "moe.shared.bias": "adamw_no_decay",
    }
    stack = next(g for g in groups if g["name"] == "cosmos_stack")
    assert (stack["algorithm"], stack["matrix_layout"], stack["split"]) == ("cosmos", "stack", None)


def test_stack_and_conv_routes_can_go_either_way():
    groups = cosmos_param_groups(Vision(), stacks="adamw", conv="cosmos",
                                 overrides={"conv1d.weight": "cosmos_stack", "moe.experts.down_proj": "cosmos_flatten",
                                            "pos_embed": "cosmos"})
    routes = {n: _route_of(groups, n) for n in ("conv1d.weight", "conv2d.weight", "moe.experts.gate_up_proj",
                                                "moe.experts.down_proj", "pos_embed")}
    assert routes == {"conv1d.weight": "cosmos_stack", "conv2d.weight": "cosmos_flatten",
                      "moe.experts.gate_up_proj": "adamw", "moe.experts.down_proj": "cosmos_flatten",
                      "pos_embed": "cosmos_stack"}


def test_transposed_expert_stacks_have_no_layout_and_go_to_adamw():
    groups = cosmos_param_groups(MoE(transposed=True))
    assert _route_of(groups, "experts.gate_up_proj") == "adamw"
    assert "expert stack stored (E, in, out) (is_transposed): no COSMOS layout" in routing_summary(groups)
    with pytest.raises(ValueError, match=r"'experts.gate_up_proj' of shape \(4, 8, 12\) is an expert stack stored "
                                         r"\(E, in, out\).*'cosmos_stack'"):
        cosmos_param_groups(MoE(transposed=True), overrides={"experts.gate_up_proj": "cosmos"})
    groups = cosmos_param_groups(MoE(transposed=True), overrides={"experts.*_proj": "cosmos_stack"})
    assert _route_of(groups, "experts.down_proj") == "cosmos_stack"


class Conv1D(nn.Module):
    """The shape of transformers' Conv1D (y = x @ W + b, W stored (nx, nf)), without transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class DeclaredTransposed(nn.Module):
    cosmos_layout = "transposed"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 12))
        self.b = nn.Parameter(torch.zeros(12))


def test_transposed_layouts_by_class_and_by_declaration():
    model = nn.Module()
    model.c_attn = Conv1D(24, 8)
    model.fake = nn.Linear(8, 8)
    model.fake.nx, model.fake.nf = 8, 8  # nx/nf alone do not make a Conv1D
    model.declared = DeclaredTransposed()
    model.per_param = nn.Linear(8, 8)
    model.per_param.cosmos_layout = {"weight": "transposed"}  # an instance attribute, per parameter
    groups = cosmos_param_groups(model)
    assert {n: _route_of(groups, n) for n in ("c_attn.weight", "fake.weight", "declared.w", "per_param.weight")} == {
        "c_attn.weight": "cosmos_transposed", "fake.weight": "cosmos", "declared.w": "cosmos_transposed",
        "per_param.weight": "cosmos_transposed"}
    assert _route_of(groups, "declared.b") == "adamw_no_decay"
    text = routing_summary(groups)
    assert "declared cosmos_layout='transposed' on DeclaredTransposed" in text
    # the parts of a transposed weight are along its OUT dimension, shape[1]
    split = next(g for g in cosmos_param_groups(model, split={"c_attn.weight": (8, 8, 8)}) if g.get("split"))
    assert (split["name"], split["split"]) == ("cosmos_transposed_split_8_8_8", (8, 8, 8))
    with pytest.raises(ValueError, match=r"the row counts sum to 8, but its transposed matrix has 24 output rows"):
        cosmos_param_groups(model, split={"c_attn.weight": (4, 4)})  # 8 would be its IN dimension
    with pytest.raises(ValueError, match=r"its transposed matrix has 24 output rows, not divisible into 5"):
        cosmos_param_groups(model, split={"c_attn.weight": 5})


@pytest.mark.parametrize(
    "declared, message",
    [
        ("sideways", r"DeclaredTransposed 'm' declares cosmos_layout='sideways': a layout must be one of"),
        ("stack", r"declares cosmos_layout='stack', but its parameter 'w' has shape \(8, 12\): 'stack' needs 3-D"),
    ],
)
def test_bad_layout_declarations_raise(declared, message):
    model = nn.Module()
    model.m = DeclaredTransposed()
    model.m.cosmos_layout = declared
    with pytest.raises(ValueError, match=message):
        cosmos_param_groups(model)


def test_interleaved_qkv_without_a_head_size_is_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = nn.Linear(8, 24)

    model = nn.Module()
    model.attn = Attention()
    with pytest.raises(ValueError, match=r"query_key_value interleaves Q, K and V per head .* no head_size/head_dim"):
        cosmos_param_groups(model, split={"*query_key_value*": 3})
    model.attn.head_size = 4
    groups = cosmos_param_groups(model, split={"*query_key_value*": 6})  # one part per head block
    assert next(g for g in groups if g.get("split"))["split"] == 6


# ---------------------------------------------------------------------- MuonAdamW on the routed groups
def test_muon_adamw_takes_transposed_groups_and_refuses_stacks_and_splits():
    from lit_cosmos import MuonAdamW

    model = nn.Module()
    model.embed = nn.Embedding(13, 8)
    model.c_fc = Conv1D(16, 8)
    opt = MuonAdamW(cosmos_param_groups(model))
    model.c_fc.weight.grad = torch.randn(8, 16)
    before = model.c_fc.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.c_fc.weight)
    with pytest.raises(ValueError, match=r"adjust_lr_fn='original' in param group 'cosmos_transposed'.*stored "
                                         r"transposed.*match_rms_adamw"):
        MuonAdamW(cosmos_param_groups(model), adjust_lr_fn="original")
    with pytest.raises(ValueError, match=r"MuonAdamW cannot split matrices: param group 'cosmos_transposed_split2' "
                                         r"has split=2"):
        MuonAdamW(cosmos_param_groups(model, split={"c_fc.weight": 2}))
    with pytest.raises(ValueError, match=r"parameter 'experts.gate_up_proj' of shape \(4, 12, 8\) in param group "
                                         r"'cosmos_stack' is an expert stack .*stacks='adamw'"):
        MuonAdamW(cosmos_param_groups(MoE()))
    MuonAdamW(cosmos_param_groups(MoE(), stacks="adamw"))
