"""Optimizer-state memory: what an optimizer really holds, and what others would hold.

Formulas, in elements per parameter (state kept in float32, 4 bytes each), for a matrix
``m x n`` with ``r = min(rank, m, n)``; a parameter is seen as matrices by the one rule of
:mod:`lit_cosmos.core.matrices` (expert stacks as ``E`` matrices, split weights as their parts,
convolutions flattened), and the formulas sum over its matrices:

=========  ==============================  ==========================================
optimizer  matrix                          every other parameter (its AdamW fallback)
=========  ==============================  ==========================================
COSMOS     ``mn + mr + nr + r^2``           ``2 numel``
AdamW      ``2mn``                          ``2 numel``
Muon       ``mn`` (momentum)                ``2 numel``
SOAP       ``2mn + 2m^2 + 2n^2``            ``2 numel``
=========  ==============================  ==========================================

SOAP's figure counts its two Adam moments, the two Kronecker factors and their eigenbases.
Step counters (one scalar per parameter) are left out of the formulas. A parameter counts as a
matrix by :func:`lit_cosmos.core.matrices.is_matrix`: in a group whose ``algorithm`` is
``"cosmos"`` or ``"muon"``, or 2-D in a group without ``algorithm`` (a plain torch optimizer).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from lit_cosmos.core.matrices import DEFAULT_RANK, Split, is_matrix, matrix_view, param_tensor
from lit_cosmos.distributed import local_tensor

__all__ = ["OPTIMIZERS", "state_numel", "formula_numel", "optimizer_state_bytes", "memory_report"]

OPTIMIZERS = ("cosmos", "adamw", "muon", "soap")


def formula_numel(
    shape: Sequence[int],
    optimizer: str,
    rank: int = DEFAULT_RANK,
    matrix: bool = True,
    layout: str = "auto",
    split: Split = None,
) -> int:
    """State elements ``optimizer`` keeps for one parameter of ``shape``.

    ``matrix`` says whether the parameter is treated as matrices (``layout`` and ``split`` as in
    its param group, see :mod:`lit_cosmos.core.matrices`); otherwise every optimizer falls back
    to AdamW.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    numel = math.prod(shape)
    if not matrix or optimizer == "adamw":
        return 2 * numel
    view = matrix_view(shape, layout, split)
    if optimizer == "cosmos":
        return view.state_numel(view.rank(rank))
    if optimizer == "muon":
        return numel
    n = view.n  # soap: per matrix 2 m n + 2 m^2 + 2 n^2
    return view.batch * sum(2 * rows * n + 2 * rows * rows + 2 * n * n for rows in view.parts)


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


def memory_report(
    param_groups: Iterable[Mapping[str, Any]], rank: Optional[int] = None, bytes_per_element: int = 4
) -> dict[str, int]:
    """Formula state bytes of every optimizer in :data:`OPTIMIZERS` for these param groups.

    Parameters that :func:`~lit_cosmos.core.matrices.is_matrix` calls matrices get each
    optimizer's matrix formula (COSMOS with the group's ``rank`` unless ``rank`` is given,
    :data:`~lit_cosmos.core.matrices.DEFAULT_RANK` when the group has none); all others fall back
    to AdamW for every optimizer, as they do in practice (embeddings, heads, norms and biases are
    not Muon/COSMOS material). AdamW, Muon and SOAP are counted with ``bytes_per_element`` per
    element (float32 state); COSMOS as it stores its state: a group with
    ``state_dtype="bfloat16"`` keeps its moments (``M``, ``V``, AdamW's ``exp_avg`` and
    ``exp_avg_sq``) in 2 bytes, the bases ``U``, ``S`` in ``bytes_per_element``.
    """
    totals = dict.fromkeys(OPTIMIZERS, 0)
    for g in param_groups:
        r = rank if rank is not None else g.get("rank", DEFAULT_RANK)
        moment = 2 if g.get("state_dtype", "float32") == "bfloat16" else bytes_per_element
        layout, split = g.get("matrix_layout") or "auto", g.get("split")
        for item in g["params"]:
            p = param_tensor(item)
            matrix = is_matrix(g, p)
            for opt in OPTIMIZERS:
                numel = formula_numel(tuple(p.shape), opt, r, matrix=matrix, layout=layout, split=split)
                totals[opt] += numel * bytes_per_element
            if moment != bytes_per_element:  # COSMOS's own storage
                if matrix:
                    view = matrix_view(p.shape, layout, split)
                    moments = view.batch * view.m * (view.n + view.rank(r))
                else:
                    moments = 2 * p.numel()
                totals["cosmos"] -= moments * (bytes_per_element - moment)
    return totals
