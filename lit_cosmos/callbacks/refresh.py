r"""
Eigenbasis Refresh
==================

Decides on which optimizer steps COSMOS refreshes the eigenbasis ``U`` of its matrices.

"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_cosmos import functional as F
from lit_cosmos.comm import local_tensor
from lit_cosmos.optim import COSMOS

__all__ = ["EigenbasisRefresh", "SCHEDULES"]

SCHEDULES = ("constant", "dense_then_sparse", "adaptive")
DRIFT_REDUCTIONS = ("max", "mean")


class EigenbasisRefresh(Callback):
    r"""Refresh the COSMOS eigenbasis on the optimizer steps a schedule chooses.

    COSMOS keeps, per matrix, a rank-``r`` basis ``U`` of the leading eigensubspace of the
    gradient second moment. Refreshing it (one or more power iterations) every step is what the
    paper does; the subspace of a trained network moves slowly, so most refreshes can be skipped.
    This callback switches every COSMOS group to manual refreshes (``update_interval = 0``) and
    calls :meth:`~lit_cosmos.COSMOS.request_refresh` right before the optimizer steps it picks.

    Steps are **optimizer steps**, numbered ``t = 1, 2, ...``: with gradient accumulation a
    schedule counts ``optimizer.step()`` calls (an optimizer step pre-hook keeps the count), never
    micro-batches. Step 1 always builds each basis from scratch (an ``eigh``), so it is never a
    refresh. A *point* of the schedule is a step on which the basis is updated; each schedule is
    "the next point is the last point plus a gap", starting from a virtual point at ``t = 0``:

    * ``"constant"``: the gap is always ``interval``: refreshes on every step ``t >= 2`` with
      ``t % interval == 0`` (the same steps as COSMOS's own ``update_interval``).
    * ``"dense_then_sparse"``: gap 1 up to step ``warmup`` (a refresh on every step
      ``2..warmup``), then gaps ``k_0 = interval`` and ``k_{i+1} = min(max_interval,
      ceil(growth * k_i))``: points ``warmup + k_0``, ``warmup + k_0 + k_1``, ... E.g.
      ``warmup=2, interval=1, growth=2, max_interval=8`` refreshes on steps 2, 3, 5, 9, 17, 25, ...
    * ``"adaptive"``: starts with gap ``interval``; each refresh measures how far every basis
      moved, the drift :math:`d = 1 - \|U_{old}^\top U_{new}\|_F^2 / r \in [0, 1]` (the mean
      squared sine of the principal angles between the two subspaces), reduced over matrices by
      ``drift_reduce`` (default the max: the fastest-moving layer decides). Then
      :math:`d < \text{drift\_low}` multiplies the gap by ``growth`` (rounded up, at most
      ``max_interval``): the basis barely moved, so refreshing less often loses little;
      :math:`d > \text{drift\_high}` divides it by ``growth`` (rounded down, at least
      ``min_interval``): the basis is going stale between refreshes; otherwise the gap stays.
      The new gap already applies to the next refresh.

    Logs (optimizer step ``t`` as the x-axis, on step 1 and on every point of the schedule):

    * ``{prefix}count``: refreshes so far (the step-1 initialisation is not counted),
    * ``{prefix}interval``: steps from this point to the next one,
    * ``{prefix}drift_mean``, ``{prefix}drift_max``: drift over matrices (refreshes only),
    * ``{prefix}power_iters``: power iterations of this refresh (refreshes only).

    ``update_interval = 0`` is part of the optimizer's param groups, so checkpoints carry it: a
    run resumed from such a checkpoint *without* this callback never refreshes unless it sets
    ``update_interval`` back.

    Under DDP or FSDP2 every rank runs the same schedule: it depends on the step counters and
    on the drift reduced over all ranks (an all-reduce on refresh steps; under DDP work split
    each rank holds the bases of its own matrices only).

    The counters and the current gap are saved in checkpoints (:meth:`state_dict`), so a resumed
    run refreshes on exactly the steps an uninterrupted run would. A resume from a checkpoint
    without this callback's state starts the schedule afresh from the restored
    ``trainer.global_step``. A step that COSMOS skips (``on_nonfinite="skip"``) does not count.

    Args:
        schedule: ``"constant"``, ``"dense_then_sparse"`` or ``"adaptive"``.
        interval: the gap of ``"constant"``, the first gap after the warmup of
            ``"dense_then_sparse"``, the starting gap of ``"adaptive"``.
        warmup: ``"dense_then_sparse"`` refreshes on every step up to this one.
        growth: factor (> 1) between successive gaps (``"dense_then_sparse"``, ``"adaptive"``).
        min_interval: smallest gap of ``"adaptive"``.
        max_interval: largest gap of ``"dense_then_sparse"`` and ``"adaptive"``.
        drift_low: ``"adaptive"`` lengthens the gap when the drift is below this.
        drift_high: ``"adaptive"`` shortens the gap when the drift is above this.
        drift_reduce: ``"max"`` or ``"mean"`` over matrices, for ``"adaptive"``.
        power_iters: power iterations per refresh. ``None`` keeps each group's own
            ``power_iters``; an int applies to every refresh; a sequence gives the first
            refreshes theirs and its last entry applies to all later ones (e.g. ``(4, 2, 1)``).
        prefix: prefix of the logged names.

    Raises:
        ValueError: from ``__init__``, for an unknown schedule or an invalid number (the message
            names it).
        MisconfigurationException: at the start of fit, when the trainer has no
            :class:`~lit_cosmos.COSMOS` optimizer (the message names the optimizers it found) or
            more than one. (Lightning itself refuses a second ``EigenbasisRefresh``: same
            ``state_key``.)

    Example::

        from lightning.pytorch import Trainer
        from lit_cosmos.callbacks import EigenbasisRefresh

        # every step for 100 steps, then gaps 2, 4, 8, ... up to 50 steps
        refresh = EigenbasisRefresh("dense_then_sparse", warmup=100, interval=2, max_interval=50,
                                    power_iters=(3, 3, 2, 1))
        trainer = Trainer(callbacks=[refresh])
    """

    def __init__(
        self,
        schedule: str = "constant",
        interval: int = 1,
        warmup: int = 10,
        growth: float = 2.0,
        min_interval: int = 1,
        max_interval: int = 100,
        drift_low: float = 0.01,
        drift_high: float = 0.1,
        drift_reduce: str = "max",
        power_iters: Union[None, int, Sequence[int]] = None,
        prefix: str = "refresh/",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        for name, value, low in (("interval", interval, 1), ("warmup", warmup, 0), ("min_interval", min_interval, 1),
                                 ("max_interval", max_interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if schedule != "constant" and not min_interval <= interval <= max_interval:
            raise ValueError(
                f"need min_interval <= interval <= max_interval, got {min_interval} <= {interval} <= {max_interval}"
            )
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not math.isfinite(growth) or growth <= 1:
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        if not 0.0 <= drift_low <= drift_high <= 1.0:
            raise ValueError(f"need 0 <= drift_low <= drift_high <= 1, got drift_low={drift_low!r}, "
                             f"drift_high={drift_high!r}")
        if drift_reduce not in DRIFT_REDUCTIONS:
            raise ValueError(f"drift_reduce must be one of {DRIFT_REDUCTIONS}, got {drift_reduce!r}")
        iters = [power_iters] if isinstance(power_iters, int) else power_iters
        if iters is not None:
            iters = list(iters)
            if not iters or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in iters):
                raise ValueError(f"power_iters must be None, an int >= 1 or a non-empty sequence of them, "
                                 f"got {power_iters!r}")
        self.schedule = schedule
        self.interval = interval
        self.warmup = warmup
        self.growth = float(growth)
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.drift_low = float(drift_low)
        self.drift_high = float(drift_high)
        self.drift_reduce = drift_reduce
        self.power_iters = iters
        self.prefix = prefix

        self._optimizer: Optional[COSMOS] = None
        self._trainer: Optional["pl.Trainer"] = None
        self._handles: list[RemovableHandle] = []
        self._loaded = False
        self._reset(anchor=0)
        # Per-step scratch, set by the pre-hook and consumed by the post-hook.
        self._pending: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ schedule
    def _reset(self, anchor: int) -> None:
        self._step = anchor  # optimizer steps taken
        self._refreshes = 0  # refreshes taken (the step-1 initialisation excluded)
        self._gap = self.interval  # the gap used after the next post-warmup point
        self._next = anchor
        self._advance(anchor, drift=None)

    def _advance(self, t: int, drift: Optional[float]) -> None:
        """Schedule the point after the one at step ``t`` (which measured ``drift``, or None)."""
        if self.schedule == "constant":
            self._next = (t // self.interval + 1) * self.interval  # the next multiple
        elif self.schedule == "dense_then_sparse":
            if t < self.warmup:
                self._next = t + 1
            else:
                self._next = t + self._gap
                self._gap = min(self.max_interval, math.ceil(self._gap * self.growth))
        else:  # adaptive
            if drift is not None:
                if drift < self.drift_low:
                    self._gap = min(self.max_interval, math.ceil(self._gap * self.growth))
                elif drift > self.drift_high:
                    self._gap = max(self.min_interval, math.floor(self._gap / self.growth))
            self._next = t + self._gap

    def _iters_for(self, index: int) -> Optional[int]:
        if self.power_iters is None:
            return None
        return self.power_iters[min(index, len(self.power_iters) - 1)]

    @property
    def refreshes(self) -> int:
        """Refreshes taken so far."""
        return self._refreshes

    @property
    def next_refresh(self) -> int:
        """The optimizer step (1-based) of the next point of the schedule."""
        return self._next

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._optimizer = _the_cosmos_optimizer(trainer, type(self).__name__)
        self._trainer = trainer
        self._remove_hooks()
        self._handles = [
            self._optimizer.register_step_pre_hook(self._pre_step),
            self._optimizer.register_step_post_hook(self._post_step),
        ]
        self._set_manual(self._optimizer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the checkpoint (if any) restored the optimizer: its param groups are the saved ones.
        if not self._loaded:
            self._reset(anchor=trainer.global_step)
        self._loaded = False
        if self._optimizer is not None:
            self._set_manual(self._optimizer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "step": self._step,
            "next_refresh": self._next,
            "gap": self._gap,
            "refreshes": self._refreshes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("schedule", self.schedule) != self.schedule:
            rank_zero_warn(
                f"EigenbasisRefresh: the checkpoint was made with schedule {state_dict['schedule']!r}, this "
                f"callback uses {self.schedule!r}; continuing its counters with the new schedule"
            )
        self._step = int(state_dict["step"])
        self._next = int(state_dict["next_refresh"])
        self._gap = int(state_dict["gap"])
        self._refreshes = int(state_dict["refreshes"])
        self._loaded = True

    # ------------------------------------------------------------------ optimizer hooks
    @staticmethod
    def _set_manual(optimizer: COSMOS) -> None:
        for group in optimizer.param_groups:
            if group["algorithm"] == "cosmos":
                group["update_interval"] = 0

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_step(self, optimizer: COSMOS, args: Any, kwargs: Any) -> None:
        # A loaded optimizer state_dict brings back saved param groups: keep refreshes manual.
        self._set_manual(optimizer)
        t = self._step + 1
        pending: dict[str, Any] = {"t": t, "refresh": False}
        # Step 1 builds every basis from scratch. The decision depends on the counters only, so
        # every rank takes it identically (under DDP work split a rank may own no matrix).
        if t >= self._next and t >= 2:
            iters = self._iters_for(self._refreshes)
            if iters is None:
                iters_used = next((g["power_iters"] for g in optimizer.param_groups if g["algorithm"] == "cosmos"), 0)
            else:
                iters_used = iters
            # Snapshot the old bases (n x r each, small) to measure the drift after the step.
            old = {id(p): local_tensor(st["U"]).clone() for _, p, st in optimizer.matrix_states()}
            pending.update(refresh=True, iters=iters_used, old=old)
            optimizer.request_refresh(iters)
        if optimizer.on_nonfinite == "skip":
            pending["marker"] = _step_marker(optimizer)
        self._pending = pending

    def _post_step(self, optimizer: COSMOS, args: Any, kwargs: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if "marker" in pending and _step_marker(optimizer) == pending["marker"]:
            return  # the optimizer skipped this step (non-finite gradient): nothing happened
        t = self._step = pending["t"]
        metrics: dict[str, float] = {}
        if t >= self._next:
            drift = None
            if pending["refresh"]:
                self._refreshes += 1
                drifts = [
                    F.basis_drift(pending["old"][id(p)], local_tensor(st["U"])).item()
                    for _, p, st in optimizer.matrix_states()
                    if id(p) in pending["old"]
                ]
                total, count, largest = self._reduce_drifts(drifts)
                if count:
                    drift = largest if self.drift_reduce == "max" else total / count
                    metrics[self.prefix + "drift_mean"] = total / count
                    metrics[self.prefix + "drift_max"] = largest
                metrics[self.prefix + "power_iters"] = float(pending["iters"])
            self._advance(t, drift)
        elif t != 1:
            return
        metrics[self.prefix + "count"] = float(self._refreshes)
        metrics[self.prefix + "interval"] = float(self._next - t)
        trainer = self._trainer
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=t)

    def _reduce_drifts(self, drifts: list[float]) -> tuple[float, int, float]:
        """``(sum, count, max)`` of the drifts over all ranks. Under DDP work split each rank holds
        only the bases of the matrices it owns, yet the adaptive rule must see all of them and
        decide identically everywhere. A collective, reached on every rank at the same steps."""
        total, count, largest = sum(drifts), len(drifts), max(drifts, default=-1.0)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return total, count, largest
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        peak = torch.tensor([largest], dtype=torch.float64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(sums[0]), int(sums[1]), float(peak[0])


def _step_marker(optimizer: torch.optim.Optimizer) -> float:
    """Sum of the per-parameter step counters: unchanged exactly when a step was skipped."""
    return sum(float(st["step"]) for st in optimizer.state.values() if "step" in st)


def _the_cosmos_optimizer(trainer: "pl.Trainer", who: str) -> COSMOS:
    found = [opt for opt in trainer.optimizers if isinstance(opt, COSMOS)]
    if len(found) != 1:
        names = [type(opt).__name__ for opt in trainer.optimizers]
        raise MisconfigurationException(
            f"{who} needs exactly one lit_cosmos.COSMOS optimizer, but the trainer's optimizers are "
            f"{names or 'none'}; return COSMOS from configure_optimizers or remove {who}"
        )
    return found[0]
