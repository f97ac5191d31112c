"""The torch-only core of lit-cosmos: kernels, optimizers, routing, memory formulas, schedules.

Nothing here imports Lightning. Modules:

* :mod:`~lit_cosmos.core.kernels`: Newton-Schulz, basis construction and refresh, each beside
  its exact slow twin.
* :mod:`~lit_cosmos.core.direction`: the functional core, one COSMOS step on a stack of matrices.
* :mod:`~lit_cosmos.core.cosmos`: the :class:`COSMOS` optimizer class.
* :mod:`~lit_cosmos.core.muon_adamw`: :class:`MuonAdamW`, torch's Muon and AdamW as one optimizer.
* :mod:`~lit_cosmos.core.routing`: which parameter gets which algorithm.
* :mod:`~lit_cosmos.core.memory`: optimizer-state formulas and measurements.
* :mod:`~lit_cosmos.core.refresh`: :class:`RefreshSchedule`, on which steps the eigenbasis is refreshed.
* :mod:`~lit_cosmos.core.lr_schedule`: :class:`WarmupCosine`, the learning-rate schedule.
"""

from lit_cosmos.core.cosmos import COSMOS
from lit_cosmos.core.lr_schedule import WarmupCosine
from lit_cosmos.core.memory import formula_numel, memory_report, optimizer_state_bytes
from lit_cosmos.core.muon_adamw import MuonAdamW
from lit_cosmos.core.refresh import RefreshSchedule
from lit_cosmos.core.routing import cosmos_param_groups, routing_summary

__all__ = [
    "COSMOS",
    "MuonAdamW",
    "RefreshSchedule",
    "WarmupCosine",
    "cosmos_param_groups",
    "formula_numel",
    "memory_report",
    "optimizer_state_bytes",
    "routing_summary",
]
