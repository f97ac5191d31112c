"""The Lightning layer of lit-cosmos: :class:`CosmosMixin` and the callbacks.

Built on the torch-only core (:mod:`lit_cosmos.core`); the core never imports this package.
"""

from lit_cosmos.lightning.callbacks import EigenbasisRefresh, MemoryMonitor, SubspaceMonitor
from lit_cosmos.lightning.mixin import CosmosConfig, CosmosMixin, WarmupCosineLR

__all__ = ["CosmosConfig", "CosmosMixin", "EigenbasisRefresh", "MemoryMonitor", "SubspaceMonitor", "WarmupCosineLR"]
