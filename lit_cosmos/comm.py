"""The communication seam between the COSMOS maths and the way parameters are laid out.

The per-matrix maths lives once, in :func:`lit_cosmos.optim.cosmos_direction`. What differs
between one process, DDP and FSDP2 is only how partial products are summed, where the
Newton-Schulz step of a residual runs, and what happens after the step. A :class:`Comm` answers
exactly those questions:

* :meth:`Comm.all_reduce` sums a tensor of partial products over the ranks holding rows of the
  same matrix (identity in one process).
* :meth:`Comm.replicate` makes a small replicated tensor (the basis ``U``) bitwise identical on
  every rank.
* :meth:`Comm.orthogonalize` returns ``NS5(R/||R||)/||NS5(R/||R||)||`` for a stack of residuals,
  given this rank's rows of each.
* :meth:`Comm.all_finite` decides, identically on every rank, whether all gradients are finite.
* :meth:`Comm.after_step` runs once after every step (DDP work split shares updated parameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor

from lit_cosmos import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim import Optimizer

__all__ = ["Comm", "LocalComm", "local_tensor", "resolve_comm", "is_dtensor"]


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t: Tensor) -> Tensor:
    """This rank's block of ``t`` (a DTensor's local shard, which shares its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _all_finite_local(tensors: Sequence[Tensor]) -> Tensor:
    # The max-abs norm is inf/nan exactly when an entry is; a 2-norm could overflow on finite data.
    norms = torch._foreach_norm(list(tensors), float("inf"))
    return torch.stack([n.float().to(tensors[0].device) for n in norms]).isfinite().all()


class Comm:
    """Single-process behaviour; subclasses override what their layout needs."""

    def all_reduce(self, t: Tensor) -> Tensor:
        return t

    def replicate(self, t: Tensor) -> Tensor:
        return t

    def orthogonalize(
        self, R: Tensor, steps: int, dtype: torch.dtype, newton_schulz: Callable[..., Tensor] = F.newton_schulz
    ) -> Tensor:
        return F.normalized_orthogonal(R, steps, dtype, newton_schulz)

    def all_finite(self, grads: Sequence[Tensor]) -> bool:
        return bool(_all_finite_local(grads))

    def after_step(self, optimizer: "Optimizer") -> None:
        return None


class LocalComm(Comm):
    """One process, whole matrices (also DDP without work split: every rank is identical)."""


def resolve_comm(comm: Optional[Comm], params: Sequence[Tensor]) -> Comm:
    """Pick the seam for these parameters: ``comm`` if given, the FSDP2 one for DTensors."""
    if comm is not None:
        if not isinstance(comm, Comm):
            raise TypeError(f"comm must be a lit_cosmos.comm.Comm, got {type(comm).__name__}")
        return comm
    if any(is_dtensor(p) for p in params):
        from lit_cosmos.distributed import FSDPComm

        return FSDPComm.from_params(params)
    return LocalComm()
