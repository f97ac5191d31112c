r"""The matrix view of a parameter: the one rule for what COSMOS, the memory formulas and the
monitors treat as a matrix.

COSMOS works on matrices in the ``nn.Linear`` layout, ``W`` of shape ``(m, n) = (out, in)``,
with its basis ``U`` on the input side (``n x r``), as the paper and the authors' code do. A
parameter is seen as a stack of such matrices, by its param group's ``matrix_layout``:

=================  ====================  ==================================================
``matrix_layout``  parameter shape       the matrices COSMOS sees
=================  ====================  ==================================================
``"linear"``       ``(out, in)``         the weight itself (``nn.Linear``)
``"transposed"``   ``(in, out)``         its transpose (``transformers``' ``Conv1D``, GPT-2)
``"stack"``        ``(E, out, in)``      ``E`` independent matrices (MoE expert stacks)
``"flatten"``      ``(out, d1, d2, ...)``  one ``(out, d1 d2 ...)`` matrix (convolutions)
``"auto"``         2-D / more            ``"linear"`` / ``"flatten"`` (the default)
=================  ====================  ==================================================

A group's ``split`` (opt-in, default ``None``) further cuts every matrix into parts along its
rows (dim 0 of the ``(out, in)`` view), each with a basis of its own: an int ``k`` gives ``k``
equal parts (Q, K, V of a fused ``qkv`` with ``k = 3``), a tuple gives the row counts of the
parts (``(d, d_kv, d_kv)`` for grouped-query attention).

Every part of every matrix of a parameter has the same rank ``r = min(rank, n, min_i m_i)``, so
the state of a parameter is a few dense tensors: ``M`` (parameter-shaped), ``U``
(``(n, r)``; ``(E, n, r)`` for a stack, ``(k, n, r)`` for ``k`` parts, ``(E, k, n, r)`` for
both), ``S`` (likewise with ``(r, r)``), ``V`` (``(m, r)``, or ``(E, m, r)`` for a stack; the
parts own row slices of it).
Its size is ``E (m n + m r) + c (n r + r^2)`` elements: ``mn + mr + nr + r^2`` for one matrix.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor

__all__ = [
    "DEFAULT_RANK",
    "MATRIX_ALGORITHMS",
    "MATRIX_LAYOUTS",
    "MatrixView",
    "group_view",
    "is_matrix",
    "matrix_view",
    "param_tensor",
    "param_name",
    "split_items",
]

#: COSMOS's default subspace rank (the paper's 64): the one place this number is written.
DEFAULT_RANK = 64
#: ``algorithm`` values of param groups whose parameters are matrices (COSMOS's, MuonAdamW's).
MATRIX_ALGORITHMS = ("cosmos", "muon")
#: Values of a param group's ``matrix_layout``.
MATRIX_LAYOUTS = ("auto", "linear", "transposed", "stack", "flatten")

Split = Union[None, int, Sequence[int]]


def param_tensor(item: Any) -> Tensor:
    """The tensor of a ``params`` entry, which is a tensor or a ``(name, tensor)`` pair."""
    return item[1] if isinstance(item, tuple) else item


def param_name(item: Any) -> Optional[str]:
    """The name of a ``(name, tensor)`` ``params`` entry, else ``None``."""
    return item[0] if isinstance(item, tuple) else None


def is_matrix(group: Mapping[str, Any], p: Tensor) -> bool:
    """Whether ``p`` of ``group`` is treated as matrices: the group's ``algorithm`` is one of
    :data:`MATRIX_ALGORITHMS`, or it has none (a plain torch optimizer's group) and ``p`` is 2-D
    (how COSMOS itself routes plain parameters)."""
    alg = group.get("algorithm")
    return p.ndim == 2 if alg is None else alg in MATRIX_ALGORITHMS


def split_items(items: Sequence[Any]) -> tuple[list[Optional[str]], list[Tensor]]:
    """``(names, tensors)`` of a list of ``params`` entries."""
    return [param_name(x) for x in items], [param_tensor(x) for x in items]


@dataclass(frozen=True)
class MatrixView:
    """How one parameter is seen as matrices (see the module docstring).

    Attributes:
        shape: the parameter's (global) shape.
        layout: the resolved layout: ``"linear"``, ``"transposed"``, ``"stack"`` or ``"flatten"``.
        parts: row counts of the parts of each matrix (one entry: not split).
    """

    shape: tuple[int, ...]
    layout: str
    parts: tuple[int, ...]

    @property
    def batch(self) -> int:
        """Matrices stacked in the parameter: ``E`` for a stack, else 1."""
        return self.shape[0] if self.layout == "stack" else 1

    @property
    def m(self) -> int:
        """Rows (output features) of each matrix."""
        if self.layout == "transposed":
            return self.shape[1]
        return self.shape[1] if self.layout == "stack" else self.shape[0]

    @property
    def n(self) -> int:
        """Columns (input features) of each matrix."""
        if self.layout == "transposed":
            return self.shape[0]
        if self.layout == "stack":
            return self.shape[2]
        return math.prod(self.shape[1:])

    @property
    def count(self) -> int:
        """Matrices with a basis of their own: ``batch * len(parts)``."""
        return self.batch * len(self.parts)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First row of every part."""
        out, start = [], 0
        for rows in self.parts:
            out.append(start)
            start += rows
        return tuple(out)

    def rank(self, rank: int) -> int:
        """The rank ``r`` every part gets for a group ``rank``: ``min(rank, n, min_i m_i)``."""
        return min(rank, self.n, *self.parts)

    # ----------------------------------------------------------------- tensors
    def matrices(self, t: Tensor) -> Tensor:
        """A ``(batch, m, n)`` view of a tensor with the parameter's (local) layout, so that writes
        go through to ``t`` (a copy only for a non-contiguous ``"flatten"``/``"linear"`` tensor, which
        is read-only here). ``t`` may hold only some rows (an FSDP2 shard) or some experts."""
        if self.layout == "transposed":
            return t.mT.unsqueeze(0)
        if self.layout == "stack":
            return t
        return t.reshape(1, t.shape[0], math.prod(t.shape[1:]))

    def from_matrices(self, D: Tensor, shape: Sequence[int]) -> Tensor:
        """``D`` (``(batch, m, n)``) in the layout of a tensor of ``shape``: the inverse of
        :meth:`matrices`, a view of ``D`` when possible."""
        if self.layout == "transposed":
            return D[0].mT
        return D.reshape(shape)

    def state_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """Global shapes of ``M``, ``U``, ``S``, ``V`` for rank ``r``. A stack keeps its expert
        dimension first in every tensor (FSDP2 shards all of them on it); a split weight has one
        ``U`` and ``S`` per part."""
        lead = ((self.batch,) if self.layout == "stack" else ()) + ((len(self.parts),) if len(self.parts) > 1 else ())
        return {
            "M": self.shape,
            "U": (*lead, self.n, r),
            "S": (*lead, r, r),
            "V": (self.batch, self.m, r) if self.layout == "stack" else (self.m, r),
        }

    def state_numel(self, r: int) -> int:
        """Elements of the COSMOS state: ``E (mn + mr) + c (nr + r^2)``."""
        return self.batch * (self.m * self.n + self.m * r) + self.count * (self.n * r + r * r)

    def ns_cost(self) -> int:
        """Newton-Schulz cost up to a constant: ``sum over matrices of m_i n min(m_i, n)``."""
        return self.batch * sum(rows * self.n * min(rows, self.n) for rows in self.parts)

    def describe(self) -> str:
        """A short label for tables: ``"E x m x n"``, ``"transposed"``, ``"split 3"``..."""
        words = []
        if self.layout == "stack":
            words.append(f"{self.batch} matrices")
        elif self.layout in ("transposed", "flatten"):
            words.append(self.layout)
        if len(self.parts) > 1:
            words.append(f"split {'/'.join(map(str, self.parts))}")
        return ", ".join(words)


@functools.lru_cache(maxsize=4096)
def _view(shape: tuple[int, ...], layout: str, split: Any) -> MatrixView:
    ndim = len(shape)
    if layout == "auto":
        layout = "linear" if ndim == 2 else "flatten"
    if layout in ("linear", "transposed") and ndim != 2:
        raise ValueError(f"matrix_layout={layout!r} needs a 2-D weight, got shape {shape}")
    if layout == "stack" and ndim != 3:
        raise ValueError(f"matrix_layout='stack' needs a 3-D (E, out, in) weight, got shape {shape}")
    if layout == "flatten" and ndim < 2:
        raise ValueError(f"matrix_layout='flatten' needs at least 2 dimensions, got shape {shape}")
    view = MatrixView(shape, layout, ())
    m = view.m
    if split is None:
        parts: tuple[int, ...] = (m,)
    elif isinstance(split, int) and not isinstance(split, bool):
        if split < 1 or m % split:
            raise ValueError(f"split={split} must be an int >= 1 that divides the {m} rows of the matrix")
        parts = (m // split,) * split
    else:
        parts = tuple(split)
        if (not parts or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in parts)
                or sum(parts) != m):
            raise ValueError(f"split={tuple(split)!r} must be row counts >= 1 that sum to the {m} rows of the matrix")
    return MatrixView(shape, layout, parts)


def matrix_view(shape: Sequence[int], layout: str = "auto", split: Split = None) -> MatrixView:
    """The :class:`MatrixView` of a parameter of ``shape`` in a group with these options.

    Raises:
        ValueError: an unknown ``layout``, a layout that does not fit the shape, or a ``split``
            that does not divide the rows.
    """
    if layout not in MATRIX_LAYOUTS:
        raise ValueError(f"matrix_layout={layout!r} must be one of {MATRIX_LAYOUTS}")
    if isinstance(split, list):
        split = tuple(split)
    return _view(tuple(int(s) for s in shape), layout, split)


def group_view(group: Mapping[str, Any], p: Tensor) -> MatrixView:
    """The view of ``p`` under ``group``'s ``matrix_layout`` and ``split`` (``"auto"``, ``None``
    when absent), naming the group and parameter when they do not fit."""
    try:
        return matrix_view(p.shape, group.get("matrix_layout") or "auto", group.get("split"))
    except ValueError as err:
        name = group.get("name")
        where = f" in param group {name!r}" if name is not None else ""
        raise ValueError(f"invalid {err}{where} (parameter of shape {tuple(p.shape)})") from None
