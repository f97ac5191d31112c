r"""Learning-rate schedules (torch only): linear warmup, then cosine decay to a floor.

With ``W`` warmup steps, ``T`` total steps and ``s`` the number of optimizer steps already
taken, step ``s + 1`` uses ``lr * f(s)`` (each param group from its own initial ``lr``) with

.. math::
    f(s) = \frac{s + 1}{W} \quad (s < W), \qquad
    f(s) = \rho + (1 - \rho)\,\tfrac12\big(1 + \cos(\pi \min(1, \tfrac{s - W}{T - W}))\big)
    \quad (s \ge W),

``rho = min_lr_ratio``: the first step already has a non-zero rate, the peak is reached at step
``W``, and the floor at step ``T`` (held beyond it). Use it as the factor of a
``torch.optim.lr_scheduler.LambdaLR``::

    from torch.optim.lr_scheduler import LambdaLR
    from lit_cosmos import WarmupCosine

    scheduler = LambdaLR(optimizer, WarmupCosine(warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WarmupCosine"]


@dataclass
class WarmupCosine:
    """``LambdaLR`` factor: linear warmup over ``warmup_steps``, cosine to ``min_lr_ratio`` at
    ``total_steps`` (formula in the module docstring). A callable object, not a closure, so
    ``LambdaLR.state_dict`` saves its fields with the checkpoint."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
