"""COSMOS on FSDP2: the :class:`Comm` for row-sharded DTensor parameters.

FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) hands the optimizer DTensors
sharded by rows, ``Shard(0)``: rank ``i`` holds rows ``[i c, (i+1) c)`` of every matrix, with
``c = ceil(m / P)`` (the last shards may be short or empty). COSMOS then needs:

===============================  =============================================================
quantity                         communication
===============================  =============================================================
``G U``, ``V``, ``X U``, ``A``   none (local rows)
``G^T (G U)`` (n x r)            all-reduce of n*r per refresh
``(G U)^T (G U)`` (r x r)        all-reduce of r*r
first basis: ``G^T G`` (n x n)   all-reduce of n*n, first step only
``U`` after QR / eigh            broadcast of n*r from one rank (keeps U bitwise identical)
``S`` after every update         broadcast of r*r from one rank (keeps S bitwise identical)
``NS5(R)``                       the residual's rows gathered on ONE owner rank per matrix,
                                 orthogonalised there, rows scattered back
Frobenius norms                  all-reduce of one scalar per matrix
===============================  =============================================================

so ``M`` and ``V`` stay sharded (``(mn + mr) / P`` per rank) and ``U``, ``S`` are replicated
(``nr + r^2``). Owners are spread so that every rank orthogonalises about the same amount of
work (greedy by ``m n min(m, n)``), and the matrices one owner handles are stacked.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lit_cosmos.distributed.base import Comm, Orthogonalizer, all_finite_local, is_dtensor

__all__ = ["FSDPComm", "assign_owners", "ns_cost", "row_layout"]


def ns_cost(m: int, n: int) -> int:
    """Newton-Schulz cost of an ``m x n`` matrix, up to a constant: ``m n min(m, n)``."""
    return m * n * min(m, n)


def assign_owners(costs: Sequence[int], world_size: int, load: Optional[list[int]] = None) -> list[int]:
    """Greedy balanced assignment (largest first to the least-loaded rank); deterministic, so
    every rank computes the same answer. ``load`` (per rank) is updated in place."""
    load = load if load is not None else [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def row_layout(m: int, world_size: int) -> list[int]:
    """Rows held by each rank for ``Shard(0)`` of ``m`` rows (``torch.chunk`` semantics)."""
    c = math.ceil(m / world_size) if m else 0
    return [max(0, min(c, m - i * c)) for i in range(world_size)]


class FSDPComm(Comm):
    """COSMOS on row-sharded DTensor parameters (FSDP2 / ``ModelParallelStrategy``)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self._load: Optional[list[int]] = None
        self._world_size: Optional[int] = None

    @classmethod
    def from_params(cls, params: Sequence[Tensor]) -> "FSDPComm":
        from torch.distributed.tensor import Shard

        meshes = []
        for p in params:
            if not is_dtensor(p):
                continue
            placements = tuple(p.placements)
            if p.device_mesh.ndim != 1 or placements != (Shard(0),):
                raise ValueError(
                    f"COSMOS supports DTensor parameters sharded by rows on a 1-D mesh, placements "
                    f"(Shard(0),) as FSDP2's fully_shard makes them; got placements {placements} on a "
                    f"{p.device_mesh.ndim}-D mesh for a parameter of shape {tuple(p.shape)}. Tensor "
                    "parallelism (Shard(1) / Replicate on a tensor-parallel mesh) is not supported: "
                    "use ModelParallelStrategy(tensor_parallel_size=1) with fully_shard."
                )
            meshes.append(p.device_mesh)
        if any(mesh != meshes[0] for mesh in meshes):
            raise ValueError("COSMOS needs all DTensor parameters on one device mesh")
        return cls(meshes[0].get_group())

    # -- helpers
    @property
    def world_size(self) -> int:
        if self._world_size is None:
            self._world_size = dist.get_world_size(self.group)
        return self._world_size

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    # -- the seam
    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t

    def replicate(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.contiguous()  # gloo scrambles non-contiguous broadcasts; QR's Q is column-major
        dist.broadcast(t, src=self._global(0), group=self.group)
        return t

    def all_finite(self, grads: Sequence[Tensor]) -> bool:
        flag = all_finite_local(grads).to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item() > 0)

    def orthogonalize(self, R: Tensor, orthogonalizer: Orthogonalizer, m: Optional[int] = None) -> Tensor:
        if self.world_size == 1:
            return orthogonalizer(R)
        if R.ndim == 2:
            return self.orthogonalize(R.unsqueeze(0), orthogonalizer, m=m)[0]
        b, m_local, n = R.shape
        P, me = self.world_size, self.rank
        rows = row_layout(m, P)
        if rows[me] != m_local:
            raise RuntimeError(f"rank {me} holds {m_local} rows of a {m}-row matrix; Shard(0) over {P} ranks gives {rows}")
        c = max(rows)
        if self._load is None:
            self._load = [0] * P
        owners = assign_owners([ns_cost(m, n)] * b, P, self._load)
        padded = R.new_zeros(b, c, n)
        padded[:, :m_local] = R
        out = torch.empty_like(R)
        for owner in range(P):
            idx = [j for j in range(b) if owners[j] == owner]
            if not idx:
                continue
            send = padded[idx].contiguous()
            gathered = [torch.empty_like(send) for _ in range(P)] if me == owner else None
            dist.gather(send, gathered, dst=self._global(owner), group=self.group)
            chunks = None
            if me == owner:
                full = torch.cat([blk[:, :rows[i]] for i, blk in enumerate(gathered)], dim=1)
                B = orthogonalizer(full)
                chunks, start = [], 0
                for i in range(P):
                    blk = send.new_zeros(len(idx), c, n)
                    blk[:, :rows[i]] = B[:, start:start + rows[i]]
                    start += rows[i]
                    chunks.append(blk)
            recv = torch.empty_like(send)
            dist.scatter(recv, chunks, src=self._global(owner), group=self.group)
            out[idx] = recv[:, :m_local]
        return out

    def after_step(self, stepped: Sequence[Tensor]) -> None:
        self._load = None
