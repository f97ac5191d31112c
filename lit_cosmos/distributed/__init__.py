"""The distributed seam of COSMOS: one interface (:class:`Comm`), one module per strategy.

* :mod:`lit_cosmos.distributed.base`: the interface, :class:`LocalComm` (one process, and DDP
  where every rank computes every update) and the tensor helpers.
* :mod:`lit_cosmos.distributed.fsdp2`: :class:`FSDPComm`, row-sharded DTensor parameters.
* :mod:`lit_cosmos.distributed.ddp_split`: :class:`DDPWorkSplit`, DDP with the matrix work split.

The optimizer calls the seam; the seam never imports the optimizer. A new strategy is a new
module with a :class:`Comm` subclass, and a name in :func:`resolve_comm`.
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor

from lit_cosmos.distributed.base import (
    Comm,
    LocalComm,
    StateBuilder,
    all_finite_local,
    is_distributed,
    is_dtensor,
    local_tensor,
)
from lit_cosmos.distributed.ddp_split import DDPWorkSplit
from lit_cosmos.distributed.fsdp2 import FSDPComm, assign_owners, row_layout

__all__ = [
    "COMM_NAMES",
    "Comm",
    "DDPWorkSplit",
    "FSDPComm",
    "LocalComm",
    "StateBuilder",
    "all_finite_local",
    "assign_owners",
    "is_distributed",
    "is_dtensor",
    "local_tensor",
    "resolve_comm",
    "row_layout",
]

COMM_NAMES = ("auto", "local", "ddp_split")


def resolve_comm(comm: Union[Comm, str, None], params: Sequence[Tensor]) -> Comm:
    """Pick the seam for these parameters.

    ``None`` / ``"auto"``: row-sharded DTensors (FSDP2) get :class:`FSDPComm`, plain tensors
    :class:`LocalComm` (also right under DDP: every rank computes every update).
    ``"ddp_split"``: :class:`DDPWorkSplit`. A :class:`Comm` is used as is.
    """
    if isinstance(comm, Comm):
        return comm
    if comm not in (None, *COMM_NAMES):
        raise ValueError(f"comm must be a lit_cosmos.distributed.Comm or one of {COMM_NAMES}, got {comm!r}")
    if comm == "ddp_split":
        if any(is_dtensor(p) for p in params):
            raise ValueError(
                "comm='ddp_split' is for DDP (whole matrices on every rank); FSDP2 DTensor parameters use comm='auto'"
            )
        return DDPWorkSplit()
    if comm == "local":
        return LocalComm()
    if any(is_dtensor(p) for p in params):
        return FSDPComm.from_params(params)
    return LocalComm()
