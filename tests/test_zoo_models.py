"""The model registry and the shared blocks: every entry at shrunken size, plus invariants."""

import re

import pytest
import torch
import torch.nn.functional as F

from zoo.config import Config
from zoo.model import GPT, apply_rope, rope_cos_sin

# Shrunken width/depth/vocab: every family setting (norm, mlp, pos, bias, tying) is kept.
SMALL = dict(n_layer=2, n_embd=32, n_head=2, intermediate_size=48, vocab_size=97, block_size=16)


def small_model(name: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name(name, **{**SMALL, **overrides}))


def loss_of(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())


@pytest.mark.parametrize("name", Config.available())
def test_registry_entry_trains_and_round_trips(name, tmp_path):
    model = small_model(name)
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size + 1))

    logits = model(idx[:, :-1])
    assert logits.shape == (2, config.block_size, config.vocab_size)
    loss = loss_of(model, idx)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname

    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    for pname, p in model.named_parameters():
        assert not torch.equal(p, before[pname]), f"{pname} did not move"

    model.eval()
    idx = idx[:, :-1]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = small_model(name, seed=1).eval()
    assert not torch.equal(restored(idx), model(idx))
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(restored(idx), model(idx), rtol=0, atol=0)
    if config.tie_embeddings:
        assert restored.lm_head.weight is restored.tok_embeddings.weight


def test_available_and_unknown_names():
    names = Config.available()
    assert {"debug", "gpt2-debug", "llama-tiny", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b",
            "gpt2-124m", "gpt2-350m"} <= set(names)
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match=r"unknown model name 'llama-2m'; available: debug, "):
        Config.from_name("llama-2m")
    with pytest.raises(ValueError, match=r"unknown Config field\(s\) \['n_layers'\]"):
        Config.from_name("debug", n_layers=3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
        (dict(mlp="relu"), "mlp='relu' is not one of"),
        (dict(pos="alibi"), "pos='alibi' is not one of"),
        (dict(family="bert"), "family='bert' is not one of"),
        (dict(n_head=3), "n_embd=64 must be divisible by n_head=3"),
        (dict(n_embd=24, n_head=8), "even head size, got n_embd/n_head=3"),
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config.from_name("debug", **overrides)


def test_overrides_keep_the_rest_of_the_entry():
    config = Config.from_name("gpt2-124m", block_size=256)
    assert config.block_size == 256 and config.n_embd == 768 and config.tie_embeddings and config.pos == "learned"
    assert Config.from_name("llama-60m").block_size == 1024


@pytest.mark.parametrize("name", Config.available())
def test_closed_form_count_equals_built_model(name):
    # The meta device builds even the 7b shape without allocating its memory.
    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


# "1b" is the GaLore/COSMOS papers' name for a 1.34B shape (1.21B without embeddings).
NAME_EXCEPTIONS = {"llama-1b": 1_339_082_752}


@pytest.mark.parametrize("name", [n for n in Config.available() if re.search(r"-\d+[mb]$", n)])
def test_named_sizes_match_their_names(name):
    count = Config.from_name(name).num_parameters()
    if name in NAME_EXCEPTIONS:
        assert count == NAME_EXCEPTIONS[name]
        return
    number, unit = re.search(r"-(\d+)([mb])$", name).groups()
    nominal = int(number) * (10**6 if unit == "m" else 10**9)
    assert abs(count - nominal) / nominal < 0.10, f"{name}: {count:,}"


def test_counts_match_published_models():
    # Published totals: GPT-2 small (HF "gpt2", tied head) and LLaMA-7B.
    assert Config.from_name("gpt2-124m").num_parameters() == 124_439_808
    assert Config.from_name("llama-7b").num_parameters() == 6_738_415_616
    assert 1_000_000 <= Config.from_name("llama-tiny").num_parameters() <= 3_000_000


@pytest.mark.parametrize("name", ["gpt2-debug", "debug"])
def test_tied_embeddings_are_one_parameter(name):
    model = small_model(name)
    tied = model.config.tie_embeddings
    assert (model.lm_head.weight is model.tok_embeddings.weight) == tied
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) != tied  # a shared Parameter is listed once, under the embedding
    if tied:
        idx = torch.randint(0, 97, (2, 9))
        loss_of(model, idx).backward()
        torch.optim.AdamW(model.parameters(), lr=1e-2).step()
        assert model.lm_head.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", ["debug", "gpt2-debug"])
def test_causal(name):
    model = small_model(name).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rotary_vs_learned_positions():
    llama, gpt2 = small_model("debug"), small_model("gpt2-debug")
    assert llama.pos_embeddings is None
    assert gpt2.pos_embeddings.weight.shape == (16, 32)

    # Rotary: a rotation per position (norms kept), and q.k depends only on the offset m - n.
    cos, sin = rope_cos_sin(llama.config, 16, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 16, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 16, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    scores = rq[0, 0] @ rk[0, 0].T
    for offset in range(-3, 4):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0])  # position 0 is not rotated

    # Both models see order: reversing a sequence changes more than the order of the logits.
    for model in (llama.eval(), gpt2.eval()):
        idx = torch.randint(0, 97, (1, 16))
        assert not torch.allclose(model(idx)[:, -1], model(idx.flip(1))[:, 0])


def test_too_long_input_raises():
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size=16"):
        small_model("debug")(torch.zeros(1, 17, dtype=torch.long))


def test_init_scales_residual_projections():
    model = GPT(Config.from_name("debug", n_embd=256, n_head=4, intermediate_size=512, n_layer=8))
    std = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].mlp.down_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(256))


def test_module_names_for_routing():
    model = small_model("gpt2-debug")
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    norms = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))}
    assert embeddings == {"tok_embeddings", "pos_embeddings"}
    assert norms == {"norm"} | {f"blocks.{i}.{k}" for i in range(2) for k in ("attn_norm", "mlp_norm")}
    assert isinstance(model.blocks, torch.nn.ModuleList) and isinstance(model.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("name", ["debug", "gpt2-debug"])
def test_activation_checkpointing_gives_same_gradients(name):
    idx = torch.randint(0, 97, (2, 17))
    grads = []
    for flag in (False, True):
        model = small_model(name)
        model.activation_checkpointing = flag
        loss_of(model, idx).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


@pytest.mark.parametrize("name", ["debug", "gpt2-debug"])
def test_bf16_autocast(name):
    model = small_model(name)
    idx = torch.randint(0, 97, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx[:, :-1])
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters())
