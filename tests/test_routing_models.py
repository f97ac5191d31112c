"""Routing of real model definitions, with no override, and a few training steps through the mixin.

The models are built from configs with random weights (no download) at tiny sizes: transformers'
GPT-2 (Conv1D weights stored (in, out), head tied to the token embedding), LLaMA, Mixtral (expert
stacks (E, out, in) and a router), modules built on torch.nn.Transformer and
nn.MultiheadAttention, and a LightningModule whose untied head has an unusual name. Each expected
table below is written by hand from the model's definition: where a practitioner puts each
parameter (hidden matrices to COSMOS in their storage layout; embeddings, output heads and MoE
routers to AdamW; norms and biases to AdamW without weight decay), not read off the code under test.
"""

import os
import re
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")  # in the dev extra; skipped only without it
transformers.logging.set_verbosity_error()  # tiny vocabularies make the configs warn about token ids

from lit_cosmos import COSMOS, CosmosConfig, CosmosMixin, MuonAdamW, cosmos_param_groups, routing_summary  # noqa: E402

VOCAB, HIDDEN, SEQ = 96, 32, 16
COSMOS_LINEAR = ("cosmos", "linear")
TRANSPOSED = ("cosmos_transposed", "transposed")
STACK = ("cosmos_stack", "stack")
ADAMW = ("adamw", None)
NO_DECAY = ("adamw_no_decay", None)


def _has_note(text, name, note):
    """The summary explains ``name`` (with block indices written *) by ``note``."""
    pattern = rf"^  {re.escape(name)}( \(\d+\))? +{re.escape(note)}$"
    assert re.search(pattern, text, flags=re.MULTILINE), text


def _routing(groups):
    """name -> (group name, matrix_layout) for every routed parameter."""
    table = {}
    for g in groups:
        for name, _ in g["params"]:
            assert name not in table, f"{name} routed twice"
            table[name] = (g["name"], g.get("matrix_layout"))
    return table


def _assert_routing(groups, expected):
    actual = _routing(groups)
    wrong = {n: (actual.get(n), want) for n, want in expected.items() if actual.get(n) != want}
    extra = sorted(set(actual) - set(expected))
    assert not wrong and not extra, f"(actual, expected): {wrong}; not in the table: {extra}"
    for g in groups:  # the keys COSMOS reads
        if g["algorithm"] == "cosmos":
            assert g["matrix_layout"] in ("linear", "transposed", "stack", "flatten") and "split" in g


# ---------------------------------------------------------------------- the models
def gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg)


def mixtral(hidden=HIDDEN, intermediate=48):
    cfg = transformers.MixtralConfig(num_hidden_layers=1, hidden_size=hidden, intermediate_size=intermediate,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ)
    return transformers.MixtralForCausalLM(cfg)


class Seq2Seq(nn.Module):
    """torch.nn.Transformer between two token embeddings, with an untied head called proj_out."""

    def __init__(self):
        super().__init__()
        self.src_embed = nn.Embedding(VOCAB, HIDDEN)
        self.tgt_embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos_embed = nn.Embedding(SEQ, HIDDEN)
        self.transformer = nn.Transformer(HIDDEN, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=64, dropout=0.0, batch_first=True)
        self.proj_out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, src, tgt):
        src = self.src_embed(src) + self.pos_embed(torch.arange(src.shape[1]))
        tgt = self.tgt_embed(tgt) + self.pos_embed(torch.arange(tgt.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.transformer(src, tgt, tgt_mask=mask, tgt_is_causal=True)
        return self.proj_out(h)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))

    def forward(self, x):
        h = self.ln1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class UnusualHeadLM(L.LightningModule):
    """A decoder-only LM on nn.MultiheadAttention whose untied head has no usual name."""

    def __init__(self, head_name="to_logits"):
        super().__init__()
        self.head_name = head_name
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(HIDDEN)
        setattr(self, head_name, nn.Linear(HIDDEN, VOCAB, bias=False))

    def forward(self, x):
        h = self.tok(x)
        for block in self.blocks:
            h = block(h)
        return getattr(self, self.head_name)(self.ln_f(h))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return F.cross_entropy(self(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


# ---------------------------------------------------------------------- routing, parameter by parameter
def test_gpt2_conv1d_is_transposed_and_the_tied_head_is_the_embedding():
    groups = cosmos_param_groups(gpt2())
    h = "transformer.h.0."
    _assert_routing(groups, {
        "transformer.wte.weight": ADAMW,  # also lm_head.weight (tied)
        "transformer.wpe.weight": ADAMW,
        h + "ln_1.weight": NO_DECAY, h + "ln_1.bias": NO_DECAY,
        h + "attn.c_attn.weight": TRANSPOSED, h + "attn.c_attn.bias": NO_DECAY,
        h + "attn.c_proj.weight": TRANSPOSED, h + "attn.c_proj.bias": NO_DECAY,
        h + "ln_2.weight": NO_DECAY, h + "ln_2.bias": NO_DECAY,
        h + "mlp.c_fc.weight": TRANSPOSED, h + "mlp.c_fc.bias": NO_DECAY,
        h + "mlp.c_proj.weight": TRANSPOSED, h + "mlp.c_proj.bias": NO_DECAY,
        "transformer.ln_f.weight": NO_DECAY, "transformer.ln_f.bias": NO_DECAY,
    })
    text = routing_summary(groups)
    assert "head: transformer.wte.weight (output head lm_head.weight, tied to this embedding)" in text
    _has_note(text, "transformer.h.*.attn.c_attn.weight", "transposed: Conv1D stores (in, out)")


def test_llama_has_linear_matrices_and_its_head_by_name():
    groups = cosmos_param_groups(llama())
    layer = "model.layers.0."
    _assert_routing(groups, {
        "model.embed_tokens.weight": ADAMW,
        **{layer + f"self_attn.{p}_proj.weight": COSMOS_LINEAR for p in "qkvo"},
        **{layer + f"mlp.{p}_proj.weight": COSMOS_LINEAR for p in ("gate", "up", "down")},
        layer + "input_layernorm.weight": NO_DECAY, layer + "post_attention_layernorm.weight": NO_DECAY,
        "model.norm.weight": NO_DECAY,
        "lm_head.weight": ADAMW,
    })
    assert "head: lm_head.weight (output head by name 'lm_head')" in routing_summary(groups)


def test_mixtral_expert_stacks_and_router():
    groups = cosmos_param_groups(mixtral())
    layer = "model.layers.0."
    _assert_routing(groups, {
        "model.embed_tokens.weight": ADAMW,
        **{layer + f"self_attn.{p}_proj.weight": COSMOS_LINEAR for p in "qkvo"},
        layer + "mlp.gate.weight": ADAMW,  # the router, (E, d)
        layer + "mlp.experts.gate_up_proj": STACK,  # (E, 2I, H)
        layer + "mlp.experts.down_proj": STACK,  # (E, H, I)
        layer + "input_layernorm.weight": NO_DECAY, layer + "post_attention_layernorm.weight": NO_DECAY,
        "model.norm.weight": NO_DECAY,
        "lm_head.weight": ADAMW,
    })
    text = routing_summary(groups)
    _has_note(text, "model.layers.*.mlp.gate.weight",
              "MoE router: one output per expert of model.layers.*.mlp.experts (E=4)")
    _has_note(text, "model.layers.*.mlp.experts.gate_up_proj",
              "expert stack: E=4 matrices in nn.Linear layout, stacks='cosmos'")


def test_torch_transformer_seq2seq_and_its_untied_head_by_vocabulary():
    groups = cosmos_param_groups(Seq2Seq())
    expected = {"src_embed.weight": ADAMW, "tgt_embed.weight": ADAMW, "pos_embed.weight": ADAMW,
                "proj_out.weight": ADAMW, "proj_out.bias": NO_DECAY,
                "transformer.encoder.norm.weight": NO_DECAY, "transformer.encoder.norm.bias": NO_DECAY,
                "transformer.decoder.norm.weight": NO_DECAY, "transformer.decoder.norm.bias": NO_DECAY}
    sides = (("encoder", ("self_attn",), (1, 2)), ("decoder", ("self_attn", "multihead_attn"), (1, 2, 3)))
    for side, attns, norms in sides:
        layer = f"transformer.{side}.layers.0."
        for attn in attns:
            expected |= {layer + f"{attn}.in_proj_weight": COSMOS_LINEAR, layer + f"{attn}.in_proj_bias": NO_DECAY,
                         layer + f"{attn}.out_proj.weight": COSMOS_LINEAR, layer + f"{attn}.out_proj.bias": NO_DECAY}
        for lin in ("linear1", "linear2"):
            expected |= {layer + f"{lin}.weight": COSMOS_LINEAR, layer + f"{lin}.bias": NO_DECAY}
        for i in norms:
            expected |= {layer + f"norm{i}.weight": NO_DECAY, layer + f"norm{i}.bias": NO_DECAY}
    _assert_routing(groups, expected)
    text = routing_summary(groups)
    assert "head: proj_out.weight (output head by vocabulary: maps to the 96 rows of src_embed" in text


@pytest.mark.parametrize("head_name", ["decoder", "to_logits", "unembed", "proj_out"])
def test_untied_head_with_an_unusual_name_is_found_by_vocabulary(head_name):
    groups = cosmos_param_groups(UnusualHeadLM(head_name))
    expected = {"tok.weight": ADAMW, f"{head_name}.weight": ADAMW, "ln_f.weight": NO_DECAY, "ln_f.bias": NO_DECAY}
    for i in range(2):
        b = f"blocks.{i}."
        expected |= {b + "ln1.weight": NO_DECAY, b + "ln1.bias": NO_DECAY, b + "ln2.weight": NO_DECAY,
                     b + "ln2.bias": NO_DECAY, b + "attn.in_proj_weight": COSMOS_LINEAR,
                     b + "attn.in_proj_bias": NO_DECAY,
                     b + "attn.out_proj.weight": COSMOS_LINEAR, b + "attn.out_proj.bias": NO_DECAY,
                     b + "mlp.0.weight": COSMOS_LINEAR, b + "mlp.0.bias": NO_DECAY,
                     b + "mlp.2.weight": COSMOS_LINEAR, b + "mlp.2.bias": NO_DECAY}
    _assert_routing(groups, expected)
    assert f"head: {head_name}.weight (output head by vocabulary: maps to the 96 rows of tok" in routing_summary(groups)


def test_gpt2_fused_qkv_split_and_mixtral_gate_up_split():
    groups = cosmos_param_groups(gpt2(), split={"*.c_attn.weight": 3})
    c_attn = next(g for g in groups if any(n.endswith("c_attn.weight") for n, _ in g["params"]))
    # Conv1D (H, 3H): the parts are along OUT, dim 0 of the (out, in) view
    assert (c_attn["name"], c_attn["matrix_layout"], c_attn["split"]) == ("cosmos_transposed_split3", "transposed", 3)
    assert [n for n, _ in c_attn["params"]] == ["transformer.h.0.attn.c_attn.weight"]
    groups = cosmos_param_groups(mixtral(), split={"*.experts.gate_up_proj": (48, 48)})
    gate_up = next(g for g in groups if g.get("split") is not None)
    assert (gate_up["name"], gate_up["matrix_layout"]) == ("cosmos_stack_split_48_48", "stack")
    assert gate_up["split"] == (48, 48)  # 2I = 96 rows of each expert's (out, in) matrix


def test_gpt_neox_interleaved_qkv_takes_only_per_head_parts():
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=HIDDEN, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB)
    model = transformers.GPTNeoXForCausalLM(cfg)
    # (3 x 32, 32) holding [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1] in blocks of head_size=16 rows
    with pytest.raises(ValueError, match=r"interleaves Q, K and V per head .* rows 0..31 cross a head block of 16 rows"
                                         r".*split=\{'\*query_key_value\*': 6\}"):
        cosmos_param_groups(model, split={"*query_key_value*": 3})
    groups = cosmos_param_groups(model, split={"*query_key_value*": 6})
    assert {g["name"] for g in groups} >= {"cosmos_split6"}


# ---------------------------------------------------------------------- the optimizers take the groups
def test_optimizers_accept_the_routed_groups():
    for build in (gpt2, llama, mixtral):
        model = build()
        torch.optim.AdamW(cosmos_param_groups(model))
        COSMOS(cosmos_param_groups(model, split={"*.c_attn.weight": 3} if build is gpt2 else None))
    MuonAdamW(cosmos_param_groups(gpt2()))  # transposed: Newton-Schulz commutes with the transpose
    MuonAdamW(cosmos_param_groups(mixtral(), stacks="adamw"))
    with pytest.raises(ValueError, match=r"parameter 'model.layers.0.mlp.experts.gate_up_proj' of shape \(4, 96, 32\) "
                                         r"in param group 'cosmos_stack' is an expert stack.*stacks='adamw'"):
        MuonAdamW(cosmos_param_groups(mixtral()))


# ---------------------------------------------------------------------- training through the mixin
class HFCausalLM(CosmosMixin, L.LightningModule):
    cosmos_config = CosmosConfig(lr=1e-2, rank=8, warmup_steps=0, min_lr_ratio=1.0)

    def __init__(self, build):
        super().__init__()
        self.model = build()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return self.model(input_ids=x, labels=x).loss


class CosmosSeq2Seq(CosmosMixin, L.LightningModule):
    cosmos_config = HFCausalLM.cosmos_config

    def __init__(self):
        super().__init__()
        self.net = Seq2Seq()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return F.cross_entropy(self.net(x, x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


class CosmosUnusualHeadLM(CosmosMixin, UnusualHeadLM):
    cosmos_config = HFCausalLM.cosmos_config


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _tokens(n=8, seed=0):
    # A few fixed sequences: a model that learns anything lowers their loss within a few steps.
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g))


def _fit(model, steps=12, **trainer_kw):
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses], **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, DataLoader(_tokens(), batch_size=4))
    return trainer, losses.values


@pytest.mark.parametrize("make", [
    pytest.param(lambda: HFCausalLM(gpt2), id="gpt2"),
    pytest.param(lambda: HFCausalLM(llama), id="llama"),
    # small experts: until COSMOS treats a stack as E matrices it sees one (E, 2I * H) matrix, whose
    # first basis costs an eigendecomposition of size 2I * H
    pytest.param(lambda: HFCausalLM(lambda: mixtral(hidden=16, intermediate=16)), id="mixtral"),
    pytest.param(CosmosSeq2Seq, id="nn.Transformer"),
    pytest.param(CosmosUnusualHeadLM, id="unusual-head"),
])
def test_trains_through_the_mixin_with_the_default_routing(make):
    torch.manual_seed(0)
    model = make()
    trainer, losses = _fit(model)
    opt = trainer.optimizers[0]
    assert type(opt) is COSMOS
    # the optimizer holds the routed groups, every trainable parameter once
    routed = [p for g in opt.param_groups for p in g["params"]]
    assert len(routed) == len({id(p) for p in routed}) == sum(p.requires_grad for p in model.parameters())
    assert all(g["matrix_layout"] for g in opt.param_groups if g["algorithm"] == "cosmos")
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses


# ---------------------------------------------------------------------- LLaMA under DDP and FSDP2
class ShardedLlama(HFCausalLM):
    """The user's own configure_model: fully_shard every decoder layer, then the root."""

    def __init__(self):
        super().__init__(llama)

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def _lightning_worker(rank, world, port, strategy, out):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    # Lightning joins processes that were started for it when LOCAL_RANK is set (as under torchrun).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world))
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on every rank
    if strategy == "ddp":
        model, strat = HFCausalLM(llama), DDPStrategy(process_group_backend="gloo")
    else:
        model, strat = ShardedLlama(), ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer, losses = _fit(model, steps=8, devices=world, strategy=strat)
    opt = trainer.optimizers[0]
    names = {g["name"]: [n for n in g["param_names"]] for g in opt.param_groups}
    sharded = sorted({type(p).__name__ for g in opt.param_groups for p in g["params"]})
    torch.save({"names": names, "losses": losses, "types": sharded}, f"{out}.{rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_llama_ddp_and_fsdp2_through_lightning(tmp_path, strategy):
    from zoo.launch import spawn

    spawn(_lightning_worker, 2, strategy, str(tmp_path / "run"))
    results = [torch.load(tmp_path / f"run.{r}.pt", weights_only=False) for r in range(2)]
    layer = "model.model.layers.0."
    want = {
        "cosmos": [layer + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        + [layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")],
        "adamw": ["model.model.embed_tokens.weight", "model.lm_head.weight"],
        "adamw_no_decay": [layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight",
                           "model.model.norm.weight"],
    }
    for r in results:
        assert {k: sorted(v) for k, v in r["names"].items()} == {k: sorted(v) for k, v in want.items()}
        assert r["types"] == (["DTensor"] if strategy == "fsdp2" else ["Parameter"])
        losses = r["losses"]
        assert len(losses) == 8 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
