r"""
Subspace Monitor
================

Logs, per COSMOS matrix, how much gradient energy the rank-r subspace captures, the size of the
update, and how well Newton-Schulz orthogonalises the residual.

"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_cosmos.core import kernels as F
from lit_cosmos.distributed import is_distributed, is_dtensor, local_tensor
from lit_cosmos.lightning.callbacks.eigenbasis_refresh import find_cosmos_optimizer
from lit_cosmos.core.cosmos import COSMOS, resolve_ns_dtype
from lit_cosmos.core.direction import momentum_estimate
from lit_cosmos.core.matrices import MatrixView, group_view
from lit_cosmos.lightning.steps import logger_step

__all__ = ["SubspaceMonitor", "ns_polar_error"]

_METRICS = ("energy", "update_rms", "update_rms_ratio", "ns_error")
_HISTOGRAMS = ("energy", "update_rms", "ns_error")


class SubspaceMonitor(Callback):
    r"""Log what COSMOS's subspace split does, every ``every_n_steps`` optimizer steps.

    For every COSMOS matrix ``W`` (``m x n``) that took the step, with gradient ``G``, basis ``U``
    (``n x r``) and first moment ``M`` as the step left them:

    * **energy** :math:`= \|GU\|_F^2 / \|G\|_F^2 \in [0, 1]`: the share of the gradient that the
      Adam part sees; the rest goes to the Newton-Schulz part. It is 1 when ``r = n``.
    * **update_rms** :math:`= \|W_{after} - W_{before}\|_F / \sqrt{mn}`, measured (the parameters
      of the monitored matrices are copied in a step pre-hook on logging steps only). COSMOS
      makes it ``lr_ratio * lr`` exactly before weight decay; **update_rms_ratio** divides it by
      the group's current ``lr_ratio * lr`` (1 up to weight decay and parameter rounding).
    * **ns_error**: how far the Newton-Schulz output is from the exact polar factor it stands for.
      With ``X`` the (Nesterov) momentum and ``R = X - XUU^\top`` the residual, COSMOS uses
      ``O = NS(R)`` in place of the polar factor ``P`` of ``R`` (``R = A\Sigma B^\top`` with the
      ``k`` singular values above ``max(m, n) * eps * sigma_max``: ``P = A_k B_k^\top``; ``O``
      is projected off ``span(U)`` after a low-precision ``NS``, as COSMOS does). Since
      the update only uses ``O / ||O||_F``, the error is scale-free:
      :math:`\|O/\|O\|_F - P/\|P\|_F\|_F \in [0, 2]`, 0 when ``NS`` maps all of ``R``'s
      singular values to the same value. A plain :math:`\|OO^\top - I\|` would be wrong here:
      ``R`` has rank at most ``n - r``, so its polar factor is not square-orthogonal. Muon's
      quintic coefficients trade exactness for speed (singular values end in about
      [0.7, 1.2]): about 0.2 for a well-conditioned (Gaussian) residual with 5 steps, more for
      an ill-conditioned one, whose small singular values Newton-Schulz cannot lift in 5 steps
      (about 0.5 for singular values spread over 4 decades). A rising error flags that, or too
      few ``ns_steps``. It costs an SVD of each matrix on logging steps. Matrices with
      ``r = n`` have no Newton-Schulz part (COSMOS skips it) and no ``ns_error``.

    Logged on Lightning's step axis (a figure about optimizer step ``t`` at x = ``t - 1``, as
    ``train/loss``; see :mod:`lit_cosmos.lightning.steps`):

    * scalars ``{prefix}{metric}_mean``, ``_min``, ``_max`` over matrices, for metric in
      ``energy``, ``update_rms``, ``update_rms_ratio``, ``ns_error``;
    * TensorBoard histograms ``{prefix}energy``, ``{prefix}update_rms``, ``{prefix}ns_error``
      over matrices (with ``histograms=True`` and a :class:`TensorBoardLogger`);
    * with ``per_layer=True`` also ``{prefix}{metric}/{parameter name}`` for every matrix.

    Distributed: under FSDP2 (DTensor parameters) the row-sharded sums are reduced over the
    shards and each residual is gathered for the SVD; under DDP work split each rank measures
    the matrices it owns and the values are gathered. These are collectives on logging steps,
    which every rank reaches together (they are keyed on ``trainer.global_step``).

    Args:
        every_n_steps: log every this many optimizer steps.
        per_layer: also log one scalar per matrix and metric.
        histograms: log TensorBoard histograms.
        update_rms: measure the update (copies the monitored matrices on logging steps).
        ns_error: measure the Newton-Schulz error (an SVD per matrix on logging steps).
        prefix: prefix of the logged names.

    Raises:
        ValueError: from ``__init__``, for ``every_n_steps < 1``.
        MisconfigurationException: in ``setup`` when the trainer has no logger; at the start of
            fit when it has more than one :class:`~lit_cosmos.COSMOS` optimizer. With none (e.g. a
            config that swapped in AdamW) it warns, naming the optimizers it found, and does nothing.

    Example::

        from lightning.pytorch import Trainer
        from lit_cosmos.callbacks import SubspaceMonitor

        trainer = Trainer(callbacks=[SubspaceMonitor(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        per_layer: bool = False,
        histograms: bool = True,
        update_rms: bool = True,
        ns_error: bool = True,
        prefix: str = "subspace/",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.histograms = histograms
        self.update_rms = update_rms
        self.ns_error = ns_error
        self.prefix = prefix
        self._trainer: Optional["pl.Trainer"] = None
        self._handles: list[RemovableHandle] = []
        self._snapshot: Optional[dict[int, Tensor]] = None
        self._active = False
        #: The per-matrix values of the last logging step: ``{metric: {name: value}}``.
        self.last_values: dict[str, dict[str, float]] = {}

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException("Cannot use SubspaceMonitor with a Trainer that has no logger.")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        optimizer = find_cosmos_optimizer(trainer, "SubspaceMonitor")
        self._trainer = trainer
        self._remove_hooks()
        if optimizer is None:
            return
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()
        self._snapshot = None
        self._active = False

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ optimizer hooks
    def _pre_step(self, optimizer: COSMOS, args: Any, kwargs: Any) -> None:
        # Inside the hooks trainer.global_step still counts the steps completed before this one.
        t = self._trainer.global_step + 1 if self._trainer is not None else 0
        self._active = t % self.every_n_steps == 0
        self._snapshot = None
        if self._active and self.update_rms:
            self._snapshot = {
                id(p): local_tensor(p).detach().clone()
                for g in optimizer.param_groups if g["algorithm"] == "cosmos" for p in g["params"]
            }

    @torch.no_grad()
    def _post_step(self, optimizer: COSMOS, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        self._active = False
        snapshot, self._snapshot = self._snapshot, None
        t = self._trainer.global_step + 1
        values = self.measure(optimizer, snapshot)
        self.last_values = values
        self._log(values, t)

    def measure(self, optimizer: COSMOS, snapshot: Optional[dict[int, Tensor]] = None) -> dict[str, dict[str, float]]:
        """Per-matrix metrics of the step just taken: ``{metric: {name: value}}``.

        ``snapshot`` maps ``id(param)`` to the parameter's (local) value before the step; without
        it ``update_rms`` is left out. Collective under FSDP2: call it on every rank.
        """
        layers = []  # (name, group, param, state)
        for gi, group in enumerate(optimizer.param_groups):
            if group["algorithm"] != "cosmos":
                continue
            names = group.get("param_names") or [f"{group.get('name', gi)}.{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                st = optimizer.state.get(p)
                if p.grad is not None and st and float(st["step"]) > 0:
                    layers.append((name, group, p, st))

        # Sums over the rows of each parameter's matrices: [||GU||^2, ||G||^2, ||dW||^2] (partial
        # under FSDP2: this rank's rows, or experts).
        partial = []
        for _, group, p, st in layers:
            view = group_view(group, p)
            G = view.matrices(local_tensor(p.grad)).float()
            bases = _bases(view, local_tensor(st["U"]).float())
            captured = sum((G[:, o:o + rows] @ bases[:, i]).square().sum() for i, (o, rows) in
                           enumerate(zip(view.offsets, view.parts)))
            dw = torch.zeros((), device=G.device)
            if snapshot is not None and id(p) in snapshot:
                dw = (local_tensor(p).float() - snapshot[id(p)].float()).square().sum()
            partial.append(torch.stack([torch.as_tensor(captured, device=G.device, dtype=G.dtype),
                                        G.square().sum(), dw]))
        sums = _sum_over_shards(partial, [p for _, _, p, _ in layers])

        values: dict[str, dict[str, float]] = {k: {} for k in _METRICS}
        for (name, group, p, st), (captured, total, dw) in zip(layers, sums):
            values["energy"][name] = captured / total if total > 0 else 0.0
            if snapshot is not None and id(p) in snapshot:
                rms = math.sqrt(dw / p.numel())
                target = group["lr_ratio"] * group["lr"]
                values["update_rms"][name] = rms
                if target > 0:
                    values["update_rms_ratio"][name] = rms / target
            if self.ns_error and st["U"].shape[-1] < st["U"].shape[-2]:  # r = n: no Newton-Schulz part
                error = _residual_ns_error(group, p, st)
                if error is not None:
                    values["ns_error"][name] = error
        if is_distributed():
            # Under DDP work split a matrix's state lives on its owner only: merge all ranks'
            # layers (under plain DDP and FSDP2 every rank has the same values already).
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            for other in gathered:
                for metric, per_layer in other.items():
                    values[metric].update(per_layer)
        return {k: v for k, v in values.items() if v}

    def _log(self, values: dict[str, dict[str, float]], step: int) -> None:
        trainer = self._trainer
        p = self.prefix
        metrics: dict[str, float] = {}
        for metric, per_layer in values.items():
            vals = list(per_layer.values())
            metrics[f"{p}{metric}_mean"] = sum(vals) / len(vals)
            metrics[f"{p}{metric}_min"] = min(vals)
            metrics[f"{p}{metric}_max"] = max(vals)
            if self.per_layer:
                metrics.update({f"{p}{metric}/{name}": v for name, v in per_layer.items()})
        x = logger_step(step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=x)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                for metric in _HISTOGRAMS:
                    if metric in values:
                        hist = torch.tensor(list(values[metric].values()), dtype=torch.float64)
                        logger.experiment.add_histogram(p + metric, hist, global_step=x)


def ns_polar_error(
    R: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, basis: Optional[Tensor] = None
) -> float:
    r"""Scale-free distance of ``O = newton_schulz(R)`` from the polar factor of ``R`` on its
    numerical range: :math:`\|O/\|O\|_F - P/\|P\|_F\|_F` (0 for ``R = 0``). With ``basis``
    (``U``, ``n x r``) and a low-precision ``dtype``, ``O``'s component in ``span(U)`` is projected
    out first, as COSMOS does. See :class:`SubspaceMonitor`."""
    R = R.float()
    O = F.newton_schulz(R, steps=steps, dtype=dtype).float()
    if basis is not None and basis.shape[-1] > 0 and dtype != torch.float32:
        O = O - (O @ basis) @ basis.mT
    A, s, Bh = torch.linalg.svd(R, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    k = int((s > s[0] * max(R.shape[-2:]) * torch.finfo(torch.float32).eps).sum())
    P = A[:, :k] @ Bh[:k]
    O_norm = torch.linalg.matrix_norm(O)
    if float(O_norm) == 0.0:
        return 1.0
    return float(torch.linalg.matrix_norm(O / O_norm - P / math.sqrt(k)))


def _bases(view: MatrixView, U: Tensor) -> Tensor:
    """``U`` of a parameter as ``(batch, parts, n, r)`` (local experts of a stack)."""
    return U.reshape(-1, len(view.parts), view.n, U.shape[-1])


def _residual_ns_error(group: dict, p: Tensor, st: dict) -> Optional[float]:
    """Rebuild the step's residual of the parameter's first matrix (first part of the first local
    expert) from the state, with the optimizer's own helpers, and measure :func:`ns_polar_error`."""
    view = group_view(group, p)
    G = view.matrices(local_tensor(p.grad)).float()
    if G.shape[0] == 0:
        return None  # a stack whose experts all live on other ranks
    M = view.matrices(local_tensor(st["M"])).float()
    U = _bases(view, local_tensor(st["U"]).float())[0, 0]
    rows = view.parts[0] if len(view.parts) > 1 else G.shape[1]
    X = momentum_estimate(G[0, :rows], M[0, :rows], t=int(float(st["step"])), beta1=group["betas"][0],
                          nesterov=group["nesterov"])
    _, R = F.project(X, U)
    if is_dtensor(p) and view.layout != "stack":  # this rank's rows of a row-sharded matrix
        from torch.distributed.tensor import DTensor

        m, n = view.m, R.shape[-1]
        R = DTensor.from_local(R, p.device_mesh, p.placements, run_check=False, shape=(m, n), stride=(n, 1))
        R = R.full_tensor()
    dtype = resolve_ns_dtype(group["ns_dtype"], torch.float32)
    return ns_polar_error(R, steps=group["ns_steps"], dtype=dtype, basis=U)


def _sum_over_shards(partial: list[Tensor], params: list[Tensor]) -> list[list[float]]:
    """Sum each layer's partial row sums over the ranks that hold its rows (DTensor parameters);
    one collective per distinct layout, in parameter order (the same on every rank)."""
    out: list[Optional[list[float]]] = [None] * len(partial)
    by_layout: dict[Any, list[int]] = defaultdict(list)
    for i, (vec, p) in enumerate(zip(partial, params)):
        if is_dtensor(p):
            by_layout[(p.device_mesh, tuple(p.placements))].append(i)
        else:
            out[i] = vec.tolist()
    for (mesh, placements), idx in by_layout.items():
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        stacked = torch.stack([partial[i] for i in idx])
        spec = [Partial() if isinstance(pl_, Shard) else Replicate() for pl_ in placements]
        total = DTensor.from_local(stacked, mesh, spec, run_check=False).full_tensor()
        for i, row in zip(idx, total.tolist()):
            out[i] = row
    return out  # type: ignore[return-value]
