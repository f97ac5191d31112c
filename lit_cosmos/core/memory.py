"""Optimizer-state memory: what an optimizer really holds, and what others would hold.

Formulas, in elements per parameter (state kept in float32, 4 bytes each), for a matrix
``m x n`` with ``r = min(rank, m, n)``:

=========  ==============================  ==========================================
optimizer  matrix                          every other parameter (its AdamW fallback)
=========  ==============================  ==========================================
COSMOS     ``mn + mr + nr + r^2``           ``2 numel``
AdamW      ``2mn``                          ``2 numel``
Muon       ``mn`` (momentum)                ``2 numel``
SOAP       ``2mn + 2m^2 + 2n^2``            ``2 numel``
=========  ==============================  ==========================================

SOAP's figure counts its two Adam moments, the two Kronecker factors and their eigenbases.
Step counters (one scalar per parameter) are left out of the formulas.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lit_cosmos.distributed import local_tensor

__all__ = ["OPTIMIZERS", "state_numel", "formula_numel", "optimizer_state_bytes", "memory_report"]

OPTIMIZERS = ("cosmos", "adamw", "muon", "soap")


def formula_numel(shape: Sequence[int], optimizer: str, rank: int = 64, matrix: bool = True) -> int:
    """State elements ``optimizer`` keeps for one parameter of ``shape``.

    ``matrix`` says whether the parameter is treated as a matrix (in a COSMOS group: >2-D
    shapes are flattened to ``(shape[0], rest)``); otherwise every optimizer falls back to AdamW.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    numel = math.prod(shape)
    if not matrix or optimizer == "adamw":
        return 2 * numel
    m, n = shape[0], math.prod(shape[1:])
    if optimizer == "cosmos":
        r = min(rank, m, n)
        return m * n + m * r + n * r + r * r
    if optimizer == "muon":
        return m * n
    return 2 * m * n + 2 * m * m + 2 * n * n  # soap


def state_numel(state: Mapping[str, Any], include_step: bool = False) -> int:
    """Elements of one parameter's state tensors (global sizes for DTensors)."""
    return sum(t.numel() for k, t in state.items() if isinstance(t, Tensor) and (include_step or k != "step"))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, include_step: bool = True) -> int:
    """Bytes of optimizer state held by THIS process (DTensor state counted by its local shard)."""
    total = 0
    for st in optimizer.state.values():
        for k, t in st.items():
            if isinstance(t, Tensor) and (include_step or k != "step"):
                loc = local_tensor(t)
                total += loc.numel() * loc.element_size()
    return total


def memory_report(param_groups: Iterable[Mapping[str, Any]], rank: int | None = None, bytes_per_element: int = 4) -> dict[str, int]:
    """Formula state bytes of every optimizer in :data:`OPTIMIZERS` for these param groups.

    Parameters in ``algorithm="cosmos"`` or ``"muon"`` groups count as matrices (with the group's
    ``rank`` unless ``rank`` is given), and so do 2-D parameters of groups without an
    ``algorithm`` (how COSMOS itself routes plain parameters); all others fall back to AdamW for
    every optimizer, as they do in practice (embeddings, heads, norms and biases are not
    Muon/COSMOS material).
    """
    totals = dict.fromkeys(OPTIMIZERS, 0)
    for g in param_groups:
        alg = g.get("algorithm")
        r = rank if rank is not None else g.get("rank", 64)
        for item in g["params"]:
            p = item[1] if isinstance(item, tuple) else item
            is_matrix = alg in ("cosmos", "muon") or (alg is None and p.ndim == 2)
            for opt in OPTIMIZERS:
                totals[opt] += formula_numel(tuple(p.shape), opt, r, matrix=is_matrix) * bytes_per_element
    return totals
