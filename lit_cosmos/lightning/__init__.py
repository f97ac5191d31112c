"""The Lightning layer of lit-cosmos: :class:`CosmosMixin`, the callbacks and :class:`FSDP2Strategy`.

Built on the torch-only core (:mod:`lit_cosmos.core`); the core never imports this package.
"""

from lit_cosmos.lightning.callbacks import EigenbasisRefresh, FinalCheckpoint, MemoryMonitor, SubspaceMonitor
from lit_cosmos.lightning.mixin import CosmosConfig, CosmosMixin, WarmupCosineLR
from lit_cosmos.lightning.strategy import FSDP2Strategy

__all__ = [
    "CosmosConfig",
    "CosmosMixin",
    "EigenbasisRefresh",
    "FSDP2Strategy",
    "FinalCheckpoint",
    "MemoryMonitor",
    "SubspaceMonitor",
    "WarmupCosineLR",
]
