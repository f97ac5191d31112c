r"""
Memory Monitor
==============

Logs the optimizer-state memory actually held, next to what AdamW, Muon and SOAP would hold.

"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_cosmos.core.matrices import DEFAULT_RANK
from lit_cosmos.core.memory import OPTIMIZERS, memory_report, optimizer_state_bytes
from lit_cosmos.distributed import is_distributed
from lit_cosmos.lightning.steps import logger_step

__all__ = ["MemoryMonitor", "formula_groups", "memory_figures"]

_MiB = 2**20
_COMPARED = ("adamw", "muon", "soap")
_LABELS = {"cosmos": "COSMOS", "adamw": "AdamW", "muon": "Muon", "soap": "SOAP"}


class MemoryMonitor(Callback):
    r"""Log the optimizer state memory really held and what other optimizers would need.

    Works with any optimizer (COSMOS or not). The *held* figure sums the tensors in
    ``optimizer.state`` of every optimizer of the trainer (DTensor state by its local shard).
    The *formula* figures (:func:`lit_cosmos.memory_report`, float32 state, step counters left
    out) are computed for the same parameters: a parameter counts as matrices when its group's
    ``algorithm`` is ``"cosmos"`` or ``"muon"``, or, in a group without ``algorithm`` (a plain
    torch optimizer), when it is 2-D (:func:`lit_cosmos.core.matrices.is_matrix`); expert stacks
    and split weights count as their matrices. Every other parameter gets the AdamW fallback of
    every optimizer (``2 numel``). COSMOS's rank is each group's ``rank``, else ``rank``.

    The savings compare the state of the whole model counted once, ``state_bytes_model``, with
    each formula: ``100 * (1 - state_bytes_model / formula)`` percent. ``state_bytes_model`` is
    measured, not assumed: per parameter, the bytes of its state tensors at their global shapes
    (a DTensor counts whole), step counters left out as in the formulas, maximised over ranks
    (so a replicated state counts once, an FSDP2 shard counts as the whole tensor, and under
    DDP work split a matrix counts on the rank that owns it), then summed. Running COSMOS it
    equals the COSMOS formula exactly, on any layout.

    Logs, on the first optimizer step (when lazily created state exists) and then every
    ``every_n_steps`` optimizer steps, on Lightning's step axis (after optimizer step ``t`` at
    x = ``t - 1``, as ``train/loss`` of that step; see :mod:`lit_cosmos.lightning.steps`):

    * ``{prefix}state_bytes``: bytes held by this rank (step counters included),
    * ``{prefix}state_bytes_all_ranks``: their sum over ranks (an all-reduce when distributed;
      every rank takes part),
    * ``{prefix}state_bytes_model``: the state of the whole model counted once (see above),
    * ``{prefix}formula_bytes/{cosmos,adamw,muon,soap}``: the formulas,
    * ``{prefix}savings_pct/{adamw,muon,soap}``: savings of ``state_bytes_model`` against each,
    * ``{prefix}cuda_max_allocated_bytes``: ``torch.cuda.max_memory_allocated`` (CUDA only).

    Once per fit, at the first logging step, a table of these figures is printed on rank 0 and
    written as TensorBoard text ``{prefix}table`` to every :class:`TensorBoardLogger`. Its last
    column divides the whole-model state held by each formula (``0.73x`` next to AdamW: the run
    holds 27% less than AdamW would), and the COSMOS row names the rank its formula uses (the
    COSMOS groups' own ``rank``; with another optimizer, the ``rank`` argument).

    Args:
        every_n_steps: log every this many optimizer steps (besides the first).
        rank: COSMOS rank for groups that do not set one (as COSMOS's default).
        print_table: print the table with ``rank_zero_info``.
        prefix: prefix of the logged names.

    Raises:
        ValueError: from ``__init__``, for ``every_n_steps < 1`` or ``rank < 0``.

    Example::

        from lightning.pytorch import Trainer
        from lit_cosmos.callbacks import MemoryMonitor

        trainer = Trainer(callbacks=[MemoryMonitor(every_n_steps=500)])
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        rank: int = DEFAULT_RANK,
        print_table: bool = True,
        prefix: str = "memory/",
    ) -> None:
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.every_n_steps = every_n_steps
        self.rank = rank
        self.print_table = print_table
        self.prefix = prefix
        self._last_step = -1
        self._table_done = False
        self.last_report: dict[str, float] = {}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_step = trainer.global_step
        self._table_done = False

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch of gradient accumulation: no optimizer step happened
        self._last_step = step
        if self._table_done and step % self.every_n_steps != 0:
            return
        report = self.measure(trainer)
        self.last_report = report
        for logger in trainer.loggers:
            logger.log_metrics(report, step=logger_step(step))
        if not self._table_done:
            self._table_done = True
            self._write_table(trainer, report, step)

    def measure(self, trainer: "pl.Trainer") -> dict[str, float]:
        """The logged figures, now. Collective when distributed: call it on every rank."""
        return memory_figures(trainer.optimizers, rank=self.rank, device=trainer.strategy.root_device,
                              prefix=self.prefix)

    def _write_table(self, trainer: "pl.Trainer", report: Mapping[str, float], step: int) -> None:
        p = self.prefix
        names = ", ".join(sorted({type(opt).__name__ for opt in trainer.optimizers})) or "none"
        model = report[p + "state_bytes_model"]
        # The rank the COSMOS formula used: that of every group holding matrices (the AdamW groups' is unused).
        ranks = sorted({g["rank"] for g in formula_groups(trainer.optimizers, self.rank)
                        if g.get("algorithm") != "adamw" and g["params"]})
        rank_txt = f" (rank {'/'.join(map(str, ranks or [self.rank]))})"
        rows = [
            (f"held by {names}, this rank", report[p + "state_bytes"], ""),
            (f"held by {names}, all ranks", report[p + "state_bytes_all_ranks"], ""),
            (f"held by {names}, whole model once, no step counters", model, ""),
        ]
        for name in OPTIMIZERS:
            formula = report[f"{p}formula_bytes/{name}"]
            label = f"formula {_LABELS[name]}" + (rank_txt if name == "cosmos" else "")
            rows.append((label, formula, f"{model / formula:.2f}x" if formula > 0 else ""))
        if p + "cuda_max_allocated_bytes" in report:
            rows.append(("CUDA max allocated (all memory)", report[p + "cuda_max_allocated_bytes"], ""))
        lines = [
            "| optimizer state | bytes | MiB | whole-model state held / this |",
            "|---|---:|---:|---:|",
            *(f"| {label} | {int(b):,} | {b / _MiB:.2f} | {s} |" for label, b, s in rows),
        ]
        table = "\n".join(lines)
        if self.print_table:
            rank_zero_info(f"Optimizer state memory after optimizer step {step}:\n{table}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(p + "table", table, global_step=logger_step(step))


def formula_groups(optimizers: Iterable[torch.optim.Optimizer], rank: int = DEFAULT_RANK) -> list[dict[str, Any]]:
    """The param groups of ``optimizers`` as :func:`~lit_cosmos.memory.memory_report` reads them,
    with ``rank`` filled in where a group has none (which parameters are matrices is
    :func:`lit_cosmos.core.matrices.is_matrix`'s rule)."""
    return [dict(g, rank=g.get("rank", rank)) for opt in optimizers for g in opt.param_groups]


def memory_figures(
    optimizers: Iterable[torch.optim.Optimizer],
    rank: int = DEFAULT_RANK,
    device: Optional[torch.device] = None,
    prefix: str = "memory/",
) -> dict[str, float]:
    """The figures :class:`MemoryMonitor` logs, for these optimizers. When ``torch.distributed``
    is initialised this runs two all-reduces over the default group (on ``device``): call it on
    every rank."""
    optimizers = list(optimizers)
    device = device or torch.device("cpu")
    held = sum(optimizer_state_bytes(opt) for opt in optimizers)
    # Per parameter, in param-group order (the same on every rank): state bytes at global shapes.
    per_param = [
        _global_state_bytes(opt.state.get(p, {}))
        for opt in optimizers for g in opt.param_groups for p in g["params"]
    ]
    held_all = torch.tensor([float(held)], dtype=torch.float64, device=device)
    model = torch.tensor(per_param or [0.0], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(held_all, op=dist.ReduceOp.SUM)
        dist.all_reduce(model, op=dist.ReduceOp.MAX)
    model_bytes = float(model.sum())
    formulas = memory_report(formula_groups(optimizers, rank))

    report: dict[str, float] = {
        prefix + "state_bytes": float(held),
        prefix + "state_bytes_all_ranks": float(held_all[0]),
        prefix + "state_bytes_model": model_bytes,
    }
    for name in OPTIMIZERS:
        report[f"{prefix}formula_bytes/{name}"] = float(formulas[name])
    for name in _COMPARED:
        if formulas[name] > 0:
            report[f"{prefix}savings_pct/{name}"] = 100.0 * (1.0 - model_bytes / formulas[name])
    if device.type == "cuda":
        report[prefix + "cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated(device))
    return report


def _global_state_bytes(state: Mapping[str, Any]) -> float:
    """Bytes of one parameter's state tensors at their global shapes (DTensors whole), no step."""
    return float(sum(t.numel() * t.element_size() for k, t in state.items() if isinstance(t, Tensor) and k != "step"))
