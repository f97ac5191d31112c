"""COSMOS on DDP with the matrix work split across ranks: :class:`DDPWorkSplit`.

DDP gives every rank whole matrices and identical (averaged) gradients, so plain COSMOS is
already correct there: every rank computes the same update. :class:`DDPWorkSplit` instead lets
each rank compute only the matrices it owns (balanced by Newton-Schulz cost), keeps their state
only on the owner, and broadcasts the new values; ``state_dict()`` consolidates the complete
state on every rank (a collective: call it on all ranks, as Lightning does), and
``load_state_dict()`` keeps the owned part again.
"""

from __future__ import annotations

from typing import MutableMapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lit_cosmos.distributed.base import Comm, StateBuilder
from lit_cosmos.distributed.fsdp2 import assign_owners, ns_cost

__all__ = ["DDPWorkSplit"]


class DDPWorkSplit(Comm):
    """DDP with the matrix work split across ranks (see the module docstring).

    Every rank must hold the same parameters with the same (averaged) gradients, as under
    DDP. Each COSMOS matrix is owned by one rank, chosen once by :func:`assign_owners`.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self._matrices: list[Tensor] = []
        self._costs: list[int] = []
        self._owner: Optional[dict[int, int]] = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def bind(self, matrices: Sequence[Tensor], costs: Optional[Sequence[int]] = None) -> None:
        """Own the matrices by their Newton-Schulz ``costs`` (default ``ns_cost`` of ``(shape[0], rest)``)."""
        self._matrices = list(matrices)
        self._costs = list(costs) if costs is not None else [
            ns_cost(p.shape[0], p.numel() // max(p.shape[0], 1)) for p in self._matrices
        ]
        self._owner = None

    def owners(self) -> dict[int, int]:
        """``id(matrix) -> owning rank``, the same on every rank (deterministic greedy balance)."""
        if self._owner is None:
            owners = assign_owners(self._costs, self.world_size)
            self._owner = {id(p): o for p, o in zip(self._matrices, owners)}
        return self._owner

    def computes(self, p: Tensor) -> bool:
        return self.owners().get(id(p), self.rank) == self.rank

    def after_step(self, stepped: Sequence[Tensor]) -> None:
        if self.world_size == 1:
            return
        owners = self.owners()
        by_owner: dict[int, list[Tensor]] = {}
        for p in stepped:
            by_owner.setdefault(owners[id(p)], []).append(p)
        for owner in range(self.world_size):
            ps = by_owner.get(owner, [])
            if not ps:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            dist.broadcast(flat, src=self._global(owner), group=self.group)
            if owner != self.rank:
                pieces = flat.split([p.numel() for p in ps])
                torch._foreach_copy_([p.detach() for p in ps], [x.view_as(p) for x, p in zip(pieces, ps)])

    def consolidate(self, state: MutableMapping[Tensor, dict], build: StateBuilder) -> None:
        """Give every rank the complete state of every matrix (a collective)."""
        if self.world_size == 1:
            return
        owners = self.owners()
        for p in self._matrices:
            owner = owners[id(p)]
            st = state.get(p, {})
            has = torch.tensor([1.0 if st else 0.0], device=p.device)
            dist.broadcast(has, src=self._global(owner), group=self.group)
            if not has.item():
                continue
            if owner != self.rank:
                st = state[p] = build(p)
            for key in sorted(k for k, v in st.items() if isinstance(v, Tensor)):
                dist.broadcast(st[key], src=self._global(owner), group=self.group)

    def drop_unowned(self, state: MutableMapping[Tensor, dict]) -> None:
        """Free the state of matrices this rank does not own."""
        if self.world_size == 1:
            return
        owners = self.owners()
        for p in self._matrices:
            if owners[id(p)] != self.rank:
                state.pop(p, None)
