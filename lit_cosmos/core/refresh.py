r"""Eigenbasis refresh schedules for COSMOS (torch only: no Lightning import here).

:class:`RefreshSchedule` decides on which optimizer steps a :class:`~lit_cosmos.COSMOS` optimizer
refreshes the eigenbasis ``U`` of its matrices, through optimizer step hooks, so it works in any
training loop. :class:`lit_cosmos.callbacks.EigenbasisRefresh` is the same schedule as a
Lightning callback.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from lit_cosmos.core import kernels as F
from lit_cosmos.distributed import is_distributed, local_tensor
from lit_cosmos.core.cosmos import COSMOS

__all__ = ["RefreshSchedule", "SCHEDULES", "DRIFT_REDUCTIONS"]

SCHEDULES = ("constant", "dense_then_sparse", "adaptive")
DRIFT_REDUCTIONS = ("max", "mean")

#: ``log_fn(metrics, step)``: receives the metrics of step 1 and of every point of the schedule.
LogFn = Callable[[dict[str, float], int], None]


class RefreshSchedule:
    r"""Refresh the COSMOS eigenbasis on the optimizer steps a schedule chooses, in any loop.

    COSMOS keeps, per matrix, a rank-``r`` basis ``U`` of the leading eigensubspace of the
    gradient second moment. Refreshing it (one or more power iterations) every step is what the
    paper does; the subspace of a trained network moves slowly, so most refreshes can be skipped.
    :meth:`attach` switches every COSMOS group of an optimizer to manual refreshes
    (``update_interval = 0``) and registers optimizer step hooks that call
    :meth:`~lit_cosmos.COSMOS.request_refresh` right before the steps the schedule picks. The
    training loop itself is unchanged: it keeps calling ``optimizer.step()``.

    Steps are **optimizer steps**, numbered ``t = 1, 2, ...``: with gradient accumulation a
    schedule counts ``optimizer.step()`` calls (the step hooks keep the count), never
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

    Metrics, on step 1 and on every point of the schedule (passed to ``log_fn(metrics, t)`` and
    kept in :attr:`last_metrics`):

    * ``{prefix}count``: refreshes so far (the step-1 initialisation is not counted),
    * ``{prefix}interval``: steps from this point to the next one,
    * ``{prefix}drift_mean``, ``{prefix}drift_max``: drift over matrices (refreshes only),
    * ``{prefix}power_iters``: power iterations of this refresh (refreshes only).

    While attached, the live COSMOS groups hold ``update_interval = 0``, but the optimizer's
    ``state_dict()`` carries each group's own ``update_interval`` (the value it had when attached,
    or the one a later ``load_state_dict`` brought): a checkpoint resumed *without* a schedule
    refreshes on its own interval instead of never. :meth:`detach` sets the own values back.

    Under DDP or FSDP2 every rank runs the same schedule: it depends on the step counters and
    on the drift reduced over all ranks (a ``torch.distributed`` all-reduce on refresh steps,
    when a process group of more than one rank is initialised, on :attr:`device`; under DDP work
    split each rank holds the bases of its own matrices only).

    The counters and the current gap are in :meth:`state_dict`: saved next to the optimizer's
    and loaded back, a resumed run refreshes on exactly the steps an uninterrupted run would. To
    resume without them, :meth:`reset` the schedule to the restored step. A step that COSMOS skips
    (``on_nonfinite="skip"``) does not count, nor does the step on all-zero gradients at lr 0
    with which ``torch.distributed.checkpoint`` builds an empty optimizer's state before loading
    into it (FSDP2 resumes).

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
        prefix: prefix of the metric names.
        log_fn: called as ``log_fn(metrics, t)`` after step 1 and after every point of the
            schedule (settable later as the attribute of the same name).
        device: where the drifts are all-reduced across ranks (settable later as the attribute
            of the same name). ``None``: the device of the optimizer's first parameter, or the
            CPU.

    Raises:
        ValueError: from ``__init__``, for an unknown schedule or an invalid number (the message
            names it).
        TypeError: from :meth:`attach`, for an optimizer that is not a :class:`~lit_cosmos.COSMOS`.

    Example::

        import torch
        from lit_cosmos import COSMOS, RefreshSchedule, cosmos_param_groups

        opt = COSMOS(cosmos_param_groups(model), lr=2e-3)
        sched = RefreshSchedule("adaptive", interval=2).attach(opt)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step()  # refreshes the bases when the schedule says so
            opt.zero_grad()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "refresh": sched.state_dict()}, "ckpt.pt")

        # resume: restore both, then continue with opt.step() as before
        ckpt = torch.load("ckpt.pt")
        model.load_state_dict(ckpt["model"])
        opt = COSMOS(cosmos_param_groups(model), lr=2e-3)
        opt.load_state_dict(ckpt["optimizer"])
        sched = RefreshSchedule("adaptive", interval=2).attach(opt)
        sched.load_state_dict(ckpt["refresh"])
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
        log_fn: Optional[LogFn] = None,
        device: Union[None, str, torch.device] = None,
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
        if log_fn is not None and not callable(log_fn):
            raise ValueError(f"log_fn must be None or a callable (metrics, step), got {log_fn!r}")
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
        #: Called as ``log_fn(metrics, t)`` after step 1 and after every point of the schedule.
        self.log_fn: Optional[LogFn] = log_fn
        #: Device of the cross-rank drift all-reduce (``None``: the optimizer's first parameter's).
        self.device: Union[None, str, torch.device] = device
        #: Metrics of the last ``step()`` call: empty unless it was step 1 or a point.
        self.last_metrics: dict[str, float] = {}

        self._optimizer: Optional[COSMOS] = None
        self._handles: list[RemovableHandle] = []
        self._own_intervals: dict[int, int] = {}  # group index -> update_interval before attach
        self.reset(0)
        # Per-step scratch, set by the pre-hook and consumed by the post-hook.
        self._pending: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ schedule
    def reset(self, anchor_step: int = 0) -> None:
        """Start the schedule afresh as if ``anchor_step`` optimizer steps had been taken (e.g. the
        step of a checkpoint restored without this schedule's state): the next point is the
        first one after ``anchor_step`` and the refresh count is 0.

        Raises:
            ValueError: for an ``anchor_step`` that is not an int >= 0.
        """
        if isinstance(anchor_step, bool) or not isinstance(anchor_step, int) or anchor_step < 0:
            raise ValueError(f"anchor_step must be an int >= 0, got {anchor_step!r}")
        self._step = anchor_step  # optimizer steps taken
        self._refreshes = 0  # refreshes taken (the step-1 initialisation excluded)
        self._gap = self.interval  # the gap used after the next post-warmup point
        self._next = anchor_step
        self._advance(anchor_step, drift=None)

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

    @property
    def optimizer(self) -> Optional[COSMOS]:
        """The optimizer this schedule is attached to, or ``None``."""
        return self._optimizer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The schedule name, the step count, the next point, the current gap and the refresh count."""
        return {
            "schedule": self.schedule,
            "step": self._step,
            "next_refresh": self._next,
            "gap": self._gap,
            "refreshes": self._refreshes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. A state saved with another schedule warns and
        continues its counters with this one."""
        if state_dict.get("schedule", self.schedule) != self.schedule:
            self._warn(
                f"{type(self).__name__}: the checkpoint was made with schedule {state_dict['schedule']!r}, this "
                f"one uses {self.schedule!r}; continuing its counters with the new schedule"
            )
        self._step = int(state_dict["step"])
        self._next = int(state_dict["next_refresh"])
        self._gap = int(state_dict["gap"])
        self._refreshes = int(state_dict["refreshes"])

    def _warn(self, message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizer: COSMOS) -> "RefreshSchedule":
        """Drive ``optimizer``'s refreshes: switch its COSMOS groups to ``update_interval = 0`` and
        register the step hooks. Detaches from any optimizer attached before; the counters are
        kept (see :meth:`reset`).

        Returns:
            this schedule, so that ``sched = RefreshSchedule(...).attach(opt)`` works.

        Raises:
            TypeError: when ``optimizer`` is not a :class:`lit_cosmos.COSMOS` (the message names
                its type).
        """
        if not isinstance(optimizer, COSMOS):
            raise TypeError(
                f"{type(self).__name__} drives a lit_cosmos.COSMOS optimizer, got "
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        self.detach()
        self._optimizer = optimizer
        self._own_intervals = {}
        self._record_own_intervals(optimizer)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._carry_own_intervals),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        self._set_manual(optimizer)
        return self

    def detach(self) -> None:
        """Remove the hooks and give every COSMOS group its own ``update_interval`` back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._optimizer is not None:
            groups = self._optimizer.param_groups
            for index, interval in self._own_intervals.items():
                if index < len(groups) and groups[index]["algorithm"] == "cosmos":
                    groups[index]["update_interval"] = interval
        self._optimizer = None
        self._pending = None

    def _record_own_intervals(self, optimizer: COSMOS) -> None:
        # 0 means "driven by a schedule" (e.g. a checkpoint saved by an older version): keep the
        # value recorded before, if any.
        for index, group in enumerate(optimizer.param_groups):
            if group["algorithm"] == "cosmos" and (group["update_interval"] != 0 or index not in self._own_intervals):
                self._own_intervals[index] = group["update_interval"]

    def _carry_own_intervals(self, optimizer: COSMOS, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Optimizer.state_dict() builds fresh group dicts: the live groups keep 0.
        groups = state_dict["param_groups"]
        for index, interval in self._own_intervals.items():
            if index < len(groups) and groups[index].get("algorithm") == "cosmos":
                groups[index]["update_interval"] = interval
        return state_dict

    def _after_load(self, optimizer: COSMOS) -> None:
        self._record_own_intervals(optimizer)
        self._set_manual(optimizer)

    @staticmethod
    def _set_manual(optimizer: COSMOS) -> None:
        for group in optimizer.param_groups:
            if group["algorithm"] == "cosmos":
                group["update_interval"] = 0

    def _pre_step(self, optimizer: COSMOS, args: Any, kwargs: Any) -> None:
        # A loaded optimizer state_dict brings back saved param groups: keep refreshes manual.
        self._set_manual(optimizer)
        if _is_state_materialisation(optimizer):
            self._pending = None  # not a training step: neither counted nor a refresh
            return
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
        self.last_metrics = {}
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
                # One drift per matrix (a stack or a split weight has several bases).
                drifts = [
                    d
                    for _, p, st in optimizer.matrix_states()
                    if id(p) in pending["old"]
                    for d in F.basis_drift(pending["old"][id(p)], local_tensor(st["U"])).reshape(-1).tolist()
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
        self.last_metrics = metrics
        self._publish(metrics, t)

    def _publish(self, metrics: dict[str, float], step: int) -> None:
        """Hand the metrics of optimizer step ``step`` on (subclasses add their loggers)."""
        if self.log_fn is not None:
            self.log_fn(dict(metrics), step)

    def _reduce_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                for p in group["params"]:
                    return p.device
        return torch.device("cpu")

    def _reduce_drifts(self, drifts: list[float]) -> tuple[float, int, float]:
        """``(sum, count, max)`` of the drifts over all ranks. Under DDP work split each rank holds
        only the bases of the matrices it owns, yet the adaptive rule must see all of them and
        decide identically everywhere. A collective, reached on every rank at the same steps."""
        total, count, largest = sum(drifts), len(drifts), max(drifts, default=-1.0)
        if not is_distributed():
            return total, count, largest
        device = self._reduce_device()
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        peak = torch.tensor([largest], dtype=torch.float64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(sums[0]), int(sums[1]), float(peak[0])


def _is_state_materialisation(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this step only builds an empty optimizer state: ``torch.distributed.checkpoint``
    does that before loading a checkpoint into an optimizer (FSDP2 resumes), with one ``step()``
    on all-zero gradients at learning rate 0. A training step never looks like that."""
    if optimizer.state or any(float(g.get("lr", 0.0)) != 0.0 for g in optimizer.param_groups):
        return False
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(grads) and not any(bool(local_tensor(grad).any()) for grad in grads)


def _step_marker(optimizer: torch.optim.Optimizer) -> float:
    """Sum of the per-parameter step counters: unchanged exactly when a step was skipped."""
    return sum(float(st["step"]) for st in optimizer.state.values() if "step" in st)
