"""lit-cosmos: the COSMOS optimizer for PyTorch, and its PyTorch Lightning integration.

Three layers, one folder each:

* :mod:`lit_cosmos.core` (torch only): :class:`COSMOS`, :class:`MuonAdamW`, the routing helper,
  memory formulas, :class:`RefreshSchedule`, :class:`WarmupCosine` and the kernels.
* :mod:`lit_cosmos.distributed` (torch only): the seam between the maths and DDP / FSDP2.
* :mod:`lit_cosmos.lightning`: :class:`CosmosMixin`, :class:`CosmosConfig`, the callbacks and
  :class:`FSDP2Strategy`,
  imported on first use, so that ``from lit_cosmos import COSMOS`` works without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lit_cosmos.core import (
    COSMOS,
    MuonAdamW,
    RefreshSchedule,
    WarmupCosine,
    cosmos_param_groups,
    formula_numel,
    memory_report,
    optimizer_state_bytes,
    routing_summary,
)

__version__ = "0.1.0"

_LAZY = {
    "CosmosMixin": "lit_cosmos.lightning.mixin",
    "CosmosConfig": "lit_cosmos.lightning.mixin",
    "EigenbasisRefresh": "lit_cosmos.lightning.callbacks",
    "FinalCheckpoint": "lit_cosmos.lightning.callbacks",
    "FSDP2Strategy": "lit_cosmos.lightning.strategy",
    "MemoryMonitor": "lit_cosmos.lightning.callbacks",
    "SubspaceMonitor": "lit_cosmos.lightning.callbacks",
}

__all__ = [
    "COSMOS",
    "MuonAdamW",
    "RefreshSchedule",
    "WarmupCosine",
    "cosmos_param_groups",
    "routing_summary",
    "formula_numel",
    "memory_report",
    "optimizer_state_bytes",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_cosmos' has no attribute {name!r}")
