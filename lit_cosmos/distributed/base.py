"""The communication seam between the COSMOS maths and the way parameters are laid out.

The per-matrix maths lives once, in :mod:`lit_cosmos.core.direction`. What differs between one
process, DDP and FSDP2 is only how partial products are summed, where the Newton-Schulz step of
a residual runs, which matrices a rank computes, and what happens after the step. A
:class:`Comm` answers exactly those questions, and never reaches into the optimizer: the
optimizer hands it tensors, its state mapping and a state builder.

* :meth:`Comm.bind` receives the optimizer's COSMOS matrices, in param-group order (the same on
  every rank), whenever the groups change.
* :meth:`Comm.all_reduce` sums a tensor of partial products over the ranks holding rows of the
  same matrix (identity in one process).
* :meth:`Comm.replicate` makes a small replicated tensor (the basis ``U``, the projected second
  moment ``S``) bitwise identical on every rank.
* :meth:`Comm.orthogonalize` applies an orthogonalising kernel to a stack of residuals, given
  this rank's rows of each.
* :meth:`Comm.all_finite` decides, identically on every rank, whether all gradients are finite.
* :meth:`Comm.computes` says whether this rank computes a matrix's update (DDP work split).
* :meth:`Comm.after_step` runs once after every step (DDP work split shares updated parameters).
* :meth:`Comm.consolidate` / :meth:`Comm.drop_unowned` make a rank's state complete before
  ``state_dict()`` and free the state it does not own afterwards (DDP work split).

This package depends on torch only, and on no other part of ``lit_cosmos``.
"""

from __future__ import annotations

from typing import Callable, MutableMapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "LocalComm", "StateBuilder", "all_finite_local", "is_distributed", "is_dtensor", "local_tensor"]

#: Builds the empty (zero) state of one parameter: ``builder(param) -> {name: tensor}``.
StateBuilder = Callable[[Tensor], dict]
#: An orthogonalising kernel on a stack of whole matrices (``(b, m, n) -> (b, m, n)``).
Orthogonalizer = Callable[[Tensor], Tensor]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t: Tensor) -> Tensor:
    """This rank's block of ``t`` (a DTensor's local shard, which shares its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_distributed(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether a process group of more than one rank is initialised (the default group if ``None``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_finite_local(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether every entry of every tensor is finite (no host sync).

    A float32 sum is NaN/Inf when an entry is (NaN, or Inf of both signs, give NaN), one cheap
    read per tensor. It also flags gradients so large that their sum overflows float32. float64
    tensors are summed in float64.
    """
    finite = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).isfinite()
              for t in tensors if t.numel()]
    if not finite:
        return torch.tensor(True)
    return torch.stack(finite).all()


class Comm:
    """Single-process behaviour; subclasses override what their layout needs."""

    def bind(self, matrices: Sequence[Tensor], costs: Optional[Sequence[int]] = None) -> None:
        """The optimizer's COSMOS matrices, in param-group order, with their Newton-Schulz costs
        (called when the groups change)."""

    def all_reduce(self, t: Tensor) -> Tensor:
        return t

    def replicate(self, t: Tensor) -> Tensor:
        return t

    def orthogonalize(self, R: Tensor, orthogonalizer: Orthogonalizer, m: Optional[int] = None) -> Tensor:
        """``orthogonalizer`` applied to every whole matrix of the stack ``R``, of which this rank
        holds the rows (``m`` rows in all)."""
        return orthogonalizer(R)

    def all_finite(self, grads: Sequence[Tensor]) -> bool:
        return bool(all_finite_local(grads))

    def computes(self, p: Tensor) -> bool:
        """Whether this rank computes the update of matrix ``p`` (all but DDP work split: yes)."""
        return True

    def after_step(self, stepped: Sequence[Tensor]) -> None:
        """After a step that updated the COSMOS matrices ``stepped`` (those with a gradient)."""

    def consolidate(self, state: MutableMapping[Tensor, dict], build: StateBuilder) -> None:
        """Before ``state_dict()``: make this rank's ``state`` complete (``build`` makes an empty one)."""

    def drop_unowned(self, state: MutableMapping[Tensor, dict]) -> None:
        """After ``state_dict()`` / ``load_state_dict()``: free state this rank does not own."""


class LocalComm(Comm):
    """One process, whole matrices (also DDP without work split: every rank is identical)."""
