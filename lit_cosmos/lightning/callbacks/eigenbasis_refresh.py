r"""
Eigenbasis Refresh
==================

Decides on which optimizer steps COSMOS refreshes the eigenbasis ``U`` of its matrices: the
Lightning face of :class:`lit_cosmos.RefreshSchedule` (:mod:`lit_cosmos.schedule`).

"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_cosmos.core.cosmos import COSMOS
from lit_cosmos.core.refresh import SCHEDULES, RefreshSchedule
from lit_cosmos.lightning.steps import logger_step

__all__ = ["EigenbasisRefresh", "SCHEDULES"]


class EigenbasisRefresh(RefreshSchedule, Callback):
    r"""Refresh the COSMOS eigenbasis on the optimizer steps a schedule chooses (Lightning callback).

    A :class:`~lit_cosmos.RefreshSchedule` (same arguments, schedules, counters and
    ``state_dict``; its docstring has the details) that Lightning drives: at the start of fit it
    attaches to the trainer's :class:`~lit_cosmos.COSMOS` optimizer, switching every COSMOS group
    to manual refreshes (``update_interval = 0``), and calls
    :meth:`~lit_cosmos.COSMOS.request_refresh` right before the optimizer steps it picks. Without
    Lightning, use :class:`~lit_cosmos.RefreshSchedule` directly.

    Steps are **optimizer steps** ``t = 1, 2, ...``, never micro-batches: gradient accumulation
    does not multiply refreshes. Step 1 builds each basis from scratch and is never a refresh.

    * ``"constant"``: a refresh on every step ``t >= 2`` with ``t % interval == 0`` (the same
      steps as COSMOS's own ``update_interval``).
    * ``"dense_then_sparse"``: every step up to ``warmup``, then gaps ``interval``,
      ``ceil(growth * gap)``, ... up to ``max_interval``. E.g. ``warmup=2, interval=1, growth=2,
      max_interval=8`` refreshes on steps 2, 3, 5, 9, 17, 25, ...
    * ``"adaptive"``: each refresh measures the basis drift
      :math:`d = 1 - \|U_{old}^\top U_{new}\|_F^2 / r`, reduced over matrices by
      ``drift_reduce``; :math:`d < \text{drift\_low}` grows the gap by ``growth`` (up to
      ``max_interval``), :math:`d > \text{drift\_high}` shrinks it (down to ``min_interval``).

    Logs to every logger of the trainer (a figure about optimizer step ``t`` at x = ``t - 1``,
    Lightning's own step axis, see :mod:`lit_cosmos.lightning.steps`; on step 1 and on every
    point of the schedule): ``{prefix}count``, ``{prefix}interval`` and, on refreshes,
    ``{prefix}drift_mean``, ``{prefix}drift_max``, ``{prefix}power_iters``.

    While the callback is attached the live COSMOS groups hold ``update_interval = 0``, but
    checkpoints carry each group's own ``update_interval``: a run resumed *without* this callback
    refreshes on the optimizer's own interval. At the end of fit the own values are set back.

    Under DDP or FSDP2 every rank runs the same schedule; the drift is all-reduced over the
    ranks on ``trainer.strategy.root_device``.

    The counters and the current gap are saved in checkpoints (:meth:`state_dict`), so a resumed
    run refreshes on exactly the steps an uninterrupted run would. A resume from a checkpoint
    without this callback's state starts the schedule afresh from the restored
    ``trainer.global_step``. A step that COSMOS skips (``on_nonfinite="skip"``) does not count,
    nor does the zero-gradient, lr-0 step of an FSDP2 (distributed checkpoint) resume.

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
        MisconfigurationException: at the start of fit, when the trainer has more than one
            :class:`~lit_cosmos.COSMOS` optimizer. With none (e.g. a config that swapped in
            AdamW) it warns, naming the optimizers it found, and does nothing. (Lightning itself refuses a second ``EigenbasisRefresh``: same
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
        super().__init__(
            schedule, interval=interval, warmup=warmup, growth=growth, min_interval=min_interval,
            max_interval=max_interval, drift_low=drift_low, drift_high=drift_high, drift_reduce=drift_reduce,
            power_iters=power_iters, prefix=prefix,
        )
        self._trainer: Optional["pl.Trainer"] = None
        self._loaded = False

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        optimizer = find_cosmos_optimizer(trainer, type(self).__name__)
        self._trainer = trainer
        if optimizer is None:
            return
        # The drift all-reduce runs where the strategy keeps its tensors (NCCL needs CUDA ones).
        self.device = getattr(trainer.strategy, "root_device", None)
        self.attach(optimizer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the checkpoint (if any) restored the optimizer: its param groups are the saved ones.
        if not self._loaded:
            self.reset(trainer.global_step)
        self._loaded = False
        if self._optimizer is not None:
            self._set_manual(self._optimizer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.detach()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.detach()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loaded = True

    def _warn(self, message: str) -> None:
        rank_zero_warn(message)

    def _publish(self, metrics: dict[str, float], step: int) -> None:
        super()._publish(metrics, step)
        trainer = self._trainer
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logger_step(step))


def find_cosmos_optimizer(trainer: "pl.Trainer", who: str) -> Optional[COSMOS]:
    """The trainer's one :class:`~lit_cosmos.COSMOS` optimizer, or ``None`` (with a warning) when it
    has none: a config that swaps COSMOS for another optimizer keeps its COSMOS callbacks, which
    then do nothing. More than one COSMOS is ambiguous and raises."""
    found = [opt for opt in trainer.optimizers if isinstance(opt, COSMOS)]
    names = [type(opt).__name__ for opt in trainer.optimizers]
    if len(found) > 1:
        raise MisconfigurationException(
            f"{who} needs exactly one lit_cosmos.COSMOS optimizer, but the trainer's optimizers are {names}"
        )
    if not found:
        rank_zero_warn(
            f"{who} acts on a lit_cosmos.COSMOS optimizer, but the trainer's optimizers are {names or 'none'}: "
            f"{who} does nothing in this run"
        )
        return None
    return found[0]
