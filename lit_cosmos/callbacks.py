"""The Lightning callbacks, under their short public path (``lit_cosmos.callbacks.EigenbasisRefresh``
in configs). They live in :mod:`lit_cosmos.lightning.callbacks`, one per file."""

from lit_cosmos.lightning.callbacks import SCHEDULES, EigenbasisRefresh, FinalCheckpoint, MemoryMonitor, SubspaceMonitor

__all__ = ["EigenbasisRefresh", "FinalCheckpoint", "MemoryMonitor", "SubspaceMonitor", "SCHEDULES"]
