"""One decoder-only transformer for both families of ``zoo.config``.

Module names are part of the interface: optimizers route parameters by them.

- ``tok_embeddings`` / ``pos_embeddings``: ``nn.Embedding`` (token ids, learned positions).
- ``blocks``: ``nn.ModuleList`` of ``Block`` (the unit for ``fully_shard`` and checkpointing).
  Inside a block: ``attn_norm``, ``attn.{q,k,v,o}_proj``, ``mlp_norm``,
  ``mlp.{gate,up,down}_proj`` (SwiGLU) or ``mlp.{up,down}_proj`` (GELU).
- ``norm``: the final norm; every norm is an ``nn.RMSNorm`` or ``nn.LayerNorm``.
- ``lm_head``: the output ``nn.Linear``. With ``tie_embeddings`` its weight IS
  ``tok_embeddings.weight`` (one Parameter, listed once by ``parameters()``).

Example::

    model = GPT.from_name("debug")
    logits = model(torch.randint(0, 257, (2, 16)))   # (2, 16, 257)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.config import Config


def make_norm(config: Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(config: Config, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_size), in float32.

    Computed per forward instead of stored in a buffer: it costs O(T * head_size), stays
    float32 under autocast, and leaves no non-persistent buffer to fix up after meta-device init.
    """
    hs = config.head_size
    inv_freq = config.rope_base ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of the last dim of x (B, H, T, hs) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.n_head, self.head_size = config.n_head, config.head_size
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GELUMLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx: LongTensor (B, T)) -> logits (B, T, vocab_size)``.

    Args:
        config: the shape and family (``Config.from_name(...)``).
        activation_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``, non-reentrant); only while training with
            grad enabled. Can be switched later by setting the attribute.
    """

    def __init__(self, config: Config, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embeddings = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.init_weights()

    @classmethod
    def from_name(cls, name: str, activation_checkpointing: bool = False, **overrides: Any) -> GPT:
        return cls(Config.from_name(name, **overrides), activation_checkpointing=activation_checkpointing)

    def init_weights(self) -> None:
        """GPT-2 style init: N(0, 0.02) everywhere, residual output projections scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
        Also the way to materialise a model built on the meta device (after ``to_empty``)."""
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                if not (self.config.tie_embeddings and module is self.lm_head):  # initialised as the embedding
                    nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.tok_embeddings(idx)
        rope = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(torch.arange(T, device=idx.device))
        else:
            rope = rope_cos_sin(self.config, T, idx.device)
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.lm_head(self.norm(x))
