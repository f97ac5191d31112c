"""lit-cosmos: the COSMOS optimizer for PyTorch, and its PyTorch Lightning integration.

The optimizer, routing helper, refresh schedule, kernels and memory formulas need only torch.
The Lightning pieces (:class:`CosmosMixin` and the callbacks) are imported on first use, so that
``from lit_cosmos import COSMOS`` works without Lightning installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from lit_cosmos.memory import formula_numel, memory_report, optimizer_state_bytes
from lit_cosmos.optim import COSMOS
from lit_cosmos.routing import cosmos_param_groups, routing_summary
from lit_cosmos.schedule import RefreshSchedule

__version__ = "0.1.0"

_LAZY = {
    "CosmosMixin": "lit_cosmos.mixin",
    "CosmosConfig": "lit_cosmos.mixin",
    "MuonAdamW": "lit_cosmos.hybrid",
    "EigenbasisRefresh": "lit_cosmos.callbacks",
    "MemoryMonitor": "lit_cosmos.callbacks",
    "SubspaceMonitor": "lit_cosmos.callbacks",
}

__all__ = [
    "COSMOS",
    "RefreshSchedule",
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
