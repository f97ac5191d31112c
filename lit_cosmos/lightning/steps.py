"""The x-axis the callbacks log against: Lightning's own.

Lightning logs every metric (``self.log`` in ``training_step`` and in validation,
``LearningRateMonitor``) at ``trainer.fit_loop.epoch_loop._batches_that_stepped``: the number of
optimizer steps taken *before* the current batch, i.e. the 0-based index of the step in progress
(``train/loss`` of the 10th step at 9, the validation after 50 steps at 49). The callbacks of
this package count optimizer steps ``t = 1, 2, ...`` (``trainer.global_step`` after the step) and
log a figure about step ``t`` at :func:`logger_step` ``(t) = t - 1``, so that all the curves of
a run share one axis.
"""

from __future__ import annotations

__all__ = ["logger_step"]


def logger_step(optimizer_step: int) -> int:
    """The x value of a figure about optimizer step ``optimizer_step`` (1-based): Lightning's index of it."""
    return max(0, optimizer_step - 1)
