"""Model configurations: one dataclass and a flat registry of named entries.

Two families share one set of blocks (see ``zoo/model.py``):

- ``llama``: RMSNorm, SwiGLU MLP, rotary positions, no biases, untied output head.
- ``gpt2``: LayerNorm, GELU MLP, learned positions, biases, output head tied to the embedding.

Example::

    config = Config.from_name("llama-130m", block_size=512)
    config.num_parameters()   # closed form, equals sum(p.numel() for p in GPT(config).parameters())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass
class Config:
    name: str = ""
    family: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 257
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    intermediate_size: int = 176
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    pos: Literal["rope", "learned"] = "rope"
    bias: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "family": ("llama", "gpt2"),
            "norm": ("rmsnorm", "layernorm"),
            "mlp": ("swiglu", "gelu"),
            "pos": ("rope", "learned"),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}")
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got n_embd/n_head={self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be positive")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def available(cls) -> list[str]:
        return [c["name"] for c in configs]

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in name_to_config:
            raise ValueError(f"unknown model name {name!r}; available: {', '.join(cls.available())}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown Config field(s) {unknown}; fields are {sorted(known)}")
        return cls(**{**name_to_config[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameter count in closed form (tied weights counted once)."""
        d, i, v, b = self.n_embd, self.intermediate_size, self.vocab_size, int(self.bias)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = 4 * d * d + 4 * d * b  # q, k, v, o projections
        if self.mlp == "swiglu":
            mlp = 3 * d * i + (2 * i + d) * b  # gate, up, down
        else:
            mlp = 2 * d * i + (i + d) * b  # up, down
        block = 2 * norm + attn + mlp
        embeddings = v * d + (self.block_size * d if self.pos == "learned" else 0)
        head = 0 if self.tie_embeddings else v * d
        return embeddings + self.n_layer * block + norm + head


# Family presets: everything that is not a size.
llama = dict(family="llama", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, norm_eps=1e-6)
gpt2 = dict(family="gpt2", norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True, norm_eps=1e-5)

configs: list[dict[str, Any]] = [
    # Tiny entries for unit tests: byte-level vocabulary (256 bytes + end-of-text).
    dict(name="debug", **llama, vocab_size=257, block_size=64, n_layer=2, n_head=4, n_embd=64,
         intermediate_size=176),
    dict(name="gpt2-debug", **gpt2, vocab_size=257, block_size=64, n_layer=2, n_head=4, n_embd=64,
         intermediate_size=256),
    # CPU quickstart on the byte-level stdlib corpus: 1.27M parameters, ~0.3 s per AdamW step of
    # 16 x 256 tokens on 2 CPU cores.
    dict(name="llama-tiny", **llama, vocab_size=257, block_size=256, n_layer=6, n_head=4, n_embd=128,
         intermediate_size=352),
]

# LLaMA shapes of the GaLore configs used by the COSMOS paper (vocab 32000, sequence 1024).
# "1b" keeps the name the papers use; it has 1.34B parameters (1.21B without embeddings).
for size, (n_embd, intermediate_size, n_head, n_layer) in {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}.items():
    configs.append(
        dict(
            name=f"llama-{size}", **llama, vocab_size=32000, block_size=1024,
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=intermediate_size,
        )
    )

# GPT-2 (Radford et al. 2019): GPT-2 vocabulary, 1024 positions, tied head, 4x MLP.
for size, (n_embd, n_head, n_layer) in {"124m": (768, 12, 12), "350m": (1024, 16, 24)}.items():
    configs.append(
        dict(
            name=f"gpt2-{size}", **gpt2, vocab_size=50257, block_size=1024,
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=4 * n_embd,
        )
    )

name_to_config: dict[str, dict[str, Any]] = {c["name"]: c for c in configs}
