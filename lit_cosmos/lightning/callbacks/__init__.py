"""PyTorch Lightning callbacks for COSMOS.

* :class:`EigenbasisRefresh`: on which optimizer steps the eigenbasis is refreshed
  (constant, dense-then-sparse or drift-adaptive schedules), resumable from checkpoints.
* :class:`MemoryMonitor`: optimizer-state bytes actually held, against the AdamW / Muon / SOAP
  formulas for the same parameters (any optimizer).
* :class:`SubspaceMonitor`: gradient energy in the rank-r subspace, update RMS and the
  Newton-Schulz error, per COSMOS matrix, summarised.
* :class:`FinalCheckpoint`: every fit ends with its final step saved (``last.ckpt``), also when
  stopped with Ctrl-C (any optimizer, any model).
"""

from lit_cosmos.lightning.callbacks.memory_monitor import MemoryMonitor
from lit_cosmos.lightning.callbacks.eigenbasis_refresh import SCHEDULES, EigenbasisRefresh
from lit_cosmos.lightning.callbacks.final_checkpoint import FinalCheckpoint
from lit_cosmos.lightning.callbacks.subspace_monitor import SubspaceMonitor

__all__ = ["EigenbasisRefresh", "FinalCheckpoint", "MemoryMonitor", "SubspaceMonitor", "SCHEDULES"]
