r"""COSMOS for an existing LightningModule, with no other change to it: ``CosmosMixin``.

.. code-block:: python

    import lightning as L
    from lit_cosmos import CosmosConfig, CosmosMixin

    class MyModel(CosmosMixin, L.LightningModule):      # CosmosMixin FIRST
        cosmos_config = CosmosConfig(lr=2e-3, rank=32)  # optional; the defaults are cosmos.md's
        ...                                             # no configure_optimizers needed

:meth:`CosmosMixin.configure_optimizers` routes the module's parameters once
(:meth:`CosmosMixin.cosmos_param_groups`, overridable), builds :class:`lit_cosmos.COSMOS` on them and
a per-step schedule: linear warmup, then cosine decay to a floor. With ``W`` warmup steps, ``T``
total steps and ``s`` the number of optimizer steps already taken, step ``s + 1`` uses
``lr * f(s)`` (each param group from its own initial ``lr``) with

.. math::
    f(s) = \frac{s + 1}{W} \quad (s < W), \qquad
    f(s) = \rho + (1 - \rho)\,\tfrac12\big(1 + \cos(\pi \min(1, \tfrac{s - W}{T - W}))\big)
    \quad (s \ge W),

``rho = min_lr_ratio``: the first step already has a non-zero rate, the peak is reached at step
``W``, and the floor at step ``T`` (held beyond it). It is one ``torch.optim.lr_scheduler.LambdaLR``
with ``"interval": "step"``, because ``CosineAnnealingLR``'s ``eta_min`` is one absolute value for
all groups whereas groups may have different rates (COSMOS's matrices and AdamW groups under
:class:`lit_cosmos.MuonAdamW` with ``muon_lr``, a group's own ``lr``). ``T`` is
``trainer.estimated_stepping_batches`` (optimizer steps, so gradient accumulation is counted)
unless ``CosmosConfig.max_steps`` is set; a warmup that does not fit in the run is shrunk to
half of it, with a warning. The schedule's fields are saved in the checkpoint; on a resume the
checkpoint's position is kept and this run's schedule applies (:class:`WarmupCosineLR`): exact
with the same settings, and a finished run continued to more steps follows the longer schedule
instead of training on at the floor rate.

**LightningCLI injection.** If the module has an attribute ``optimizer`` (an
``OptimizerCallable``: ``params -> Optimizer``) it is called with the routed param groups instead
of building COSMOS, and an attribute ``lr_scheduler`` (``LRSchedulerCallable``:
``optimizer -> scheduler``) replaces the warmup-cosine schedule (it is stepped every optimizer
step; ``lightning.pytorch.cli.ReduceLROnPlateau`` every epoch, on its ``monitor``; torch's own
``ReduceLROnPlateau`` names no metric and is refused with a TypeError). ``None`` means "not injected".
Declare them in ``__init__`` with ``None`` or a MODULE-LEVEL FUNCTION as default, never a lambda
(jsonargparse turns a lambda default into a ``class_path`` whose ``init_args`` then leak into
whatever class a config substitutes). The function needs a return annotation naming an
``Optimizer`` (scheduler) class: without one jsonargparse 4.53 silently passes the module its
import path as a STRING (the mixin then raises a TypeError saying so):

.. code-block:: python

    from typing import Optional
    from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
    from lit_cosmos import COSMOS

    def cosmos_optimizer(params) -> COSMOS:             # module level, annotated, not a lambda
        return COSMOS(params, lr=2e-3)

    class MyModel(CosmosMixin, L.LightningModule):
        def __init__(self, optimizer: OptimizerCallable = cosmos_optimizer,
                     lr_scheduler: Optional[LRSchedulerCallable] = None):
            super().__init__()
            self.optimizer = optimizer                  # or default None: COSMOS from cosmos_config
            self.lr_scheduler = lr_scheduler            # None: the warmup-cosine schedule

.. code-block:: yaml

    model:
      class_path: my_package.MyModel
      init_args:
        optimizer:
          class_path: lit_cosmos.MuonAdamW              # or torch.optim.AdamW, lit_cosmos.COSMOS
          init_args: {lr: 0.002, weight_decay: 0.1}

Do not use LightningCLI's top-level ``optimizer:`` / ``lr_scheduler:`` keys with this mixin: they
replace ``configure_optimizers`` (losing the routing) and break FSDP2.

The optimizer is built in ``configure_optimizers``, so after ``configure_model`` (FSDP2 shards
the parameters first, and routing sees the sharded ones).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lit_cosmos.core.cosmos import COSMOS
from lit_cosmos.core.lr_schedule import WarmupCosine
from lit_cosmos.core.routing import DEFAULT_HEAD_NAMES, cosmos_param_groups, routing_summary

__all__ = ["CosmosConfig", "CosmosMixin", "WarmupCosine", "WarmupCosineLR", "FSDP1_ERROR", "check_strategy"]

FSDP1_ERROR = (
    "FSDP1 (strategy='fsdp', FSDPStrategy) is not supported: it hands the optimizer flattened 1-D shards "
    "of the weights, so a matrix optimizer such as COSMOS or Muon cannot see the matrices (and saving "
    "its state fails). Use FSDP2 instead: lit_cosmos.lightning.FSDP2Strategy (strategy='fsdp2', a "
    "ModelParallelStrategy over every process) with fully_shard in configure_model, e.g. "
    "`--config configs/strategy/fsdp2.yaml`."
)


def check_strategy(strategy: Any) -> None:
    """Raise a ``RuntimeError`` for strategies no matrix optimizer can run under (FSDP1)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise RuntimeError(FSDP1_ERROR)

_COSMOS_ARGS = tuple(p for p in inspect.signature(COSMOS).parameters if p != "params")
_ROUTING_ARGS = tuple(
    name for name, p in inspect.signature(cosmos_param_groups).parameters.items()
    if name != "module" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
)


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _is_int(v: Any, low: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= low


@dataclass(frozen=True)
class CosmosConfig:
    """Optimizer, routing and schedule settings of :class:`CosmosMixin` (a class attribute).

    Optimizer (see :class:`lit_cosmos.COSMOS`, whose defaults these are):
        lr: AdamW-group rate and base rate (2e-3). lr_ratio: matrix update RMS ``lr_ratio*lr``
        (0.2). betas: matrix ``(beta1, beta2)`` ((0.95, 0.95)). rank: subspace rank (64).
        gamma: Newton-Schulz weight (0.2). weight_decay: decoupled, times ``lr`` (0.1).
        adamw_betas: betas of the AdamW groups ((0.9, 0.95)).
        optimizer_kwargs: any other :class:`~lit_cosmos.COSMOS` argument, e.g.
        ``{"update_interval": 10, "ns_dtype": "float32"}``.

    Schedule:
        warmup_steps: linear-warmup steps; when given it wins over ``warmup_fraction``.
        warmup_fraction: warmup as a fraction of the total steps, rounded (default 0.01).
        min_lr_ratio: the cosine floor as a fraction of each group's peak rate (default 0.1;
            ``min_lr_ratio=1.0`` with no warmup gives a constant rate).
        max_steps: total steps of the schedule (default: ``trainer.estimated_stepping_batches``).

    Routing (see :func:`lit_cosmos.cosmos_param_groups`): overrides, head_names, conv.

    Messages:
        names: how errors and warnings name a field, for a module that takes its settings under
            other names: ``{"warmup_steps": "model.init_args.warmup_steps"}`` (the zoo's
            ``CausalLM`` passes the keys of its LightningCLI config); ``"total_steps"`` names what
            sets the total when ``max_steps`` is not given (default ``Trainer(max_steps=...)``).
            Fields not in it are named ``CosmosConfig.<field>``. Not compared, not a setting.

    A warmup that does not fit in the run (``warmup_steps >= total steps``, e.g. a smoke run with
    ``max_steps=5``) is shrunk to half the run, with a warning naming the setting.

    Raises:
        ValueError: at construction, naming the bad value (negative ``lr``, ``min_lr_ratio``
            outside [0, 1], an unknown ``optimizer_kwargs`` key...). COSMOS's own arguments are
            checked again by COSMOS.
    """

    lr: float = 2e-3
    lr_ratio: float = 0.2
    betas: tuple[float, float] = (0.95, 0.95)
    rank: int = 64
    gamma: float = 0.2
    weight_decay: float = 0.1
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    warmup_steps: Optional[int] = None
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.1
    max_steps: Optional[int] = None
    overrides: Optional[Mapping[str, str]] = None
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES
    conv: str = "adamw"
    names: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def key(self, name: str) -> str:
        """The name messages give the field ``name``: the key the user typed (see ``names``)."""
        if name in self.names:
            return self.names[name]
        return "Trainer(max_steps=...)" if name == "total_steps" else f"CosmosConfig.{name}"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid {self.key(name)}={getattr(self, name)!r}: {why}")

        if not isinstance(self.names, Mapping) or not all(isinstance(v, str) for v in self.names.values()):
            raise ValueError(f"invalid CosmosConfig.names={self.names!r}: must map field names to strings")

        for name in ("lr", "lr_ratio", "gamma", "weight_decay"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0")
        if not _is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if not _is_number(self.warmup_fraction) or not 0.0 <= self.warmup_fraction < 1.0:
            raise bad("warmup_fraction", "must be in [0, 1)")
        if self.warmup_steps is not None and not _is_int(self.warmup_steps, low=0):
            raise bad("warmup_steps", "must be None or an int >= 0")
        if self.max_steps is not None and not _is_int(self.max_steps, low=1):
            raise bad("max_steps", "must be None or an int >= 1")
        if not _is_int(self.rank, low=0):
            raise bad("rank", "must be an int >= 0")
        if self.conv not in ("adamw", "cosmos"):
            raise bad("conv", "must be 'adamw' or 'cosmos'")
        for name in ("betas", "adamw_betas"):
            pair = getattr(self, name)
            if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                    or not all(_is_number(b) and 0.0 <= b < 1.0 for b in pair)):
                raise bad(name, "must be a pair of numbers in [0, 1)")
        if isinstance(self.head_names, (str, bytes)) or not all(isinstance(n, str) for n in self.head_names):
            raise bad("head_names", "must be a sequence of attribute names such as ('lm_head',), not one string")
        named = {f.name for f in dataclasses.fields(self)} & set(_COSMOS_ARGS)
        for key in self.optimizer_kwargs:
            if key in named:
                raise bad("optimizer_kwargs", f"{key!r} is a CosmosConfig field: set CosmosConfig({key}=...) instead")
            if key not in _COSMOS_ARGS:
                raise bad("optimizer_kwargs", f"{key!r} is not a COSMOS argument (known: {', '.join(_COSMOS_ARGS)})")

    def build_optimizer(self, params: Any) -> COSMOS:
        """COSMOS over ``params`` with these settings."""
        return COSMOS(
            params, lr=self.lr, lr_ratio=self.lr_ratio, betas=tuple(self.betas), rank=self.rank, gamma=self.gamma,
            weight_decay=self.weight_decay, adamw_betas=tuple(self.adamw_betas), **self.optimizer_kwargs,
        )

    def resolve_warmup(self, total_steps: int) -> int:
        """Warmup steps for a run of ``total_steps``.

        A warmup of ``total_steps`` or more would never reach the peak rate nor decay; it is
        shrunk to ``total_steps // 2`` (so that even a 5-step smoke run warms up and decays),
        with a warning naming the setting it came from.
        """
        if self.warmup_steps is not None:
            warmup, source = self.warmup_steps, f"{self.key('warmup_steps')}={self.warmup_steps}"
        else:
            warmup = int(round(self.warmup_fraction * total_steps))
            source = f"{self.key('warmup_fraction')}={self.warmup_fraction} (= {warmup} steps)"
        if warmup >= total_steps:
            shrunk = total_steps // 2
            rank_zero_warn(
                f"{source} is not shorter than this run's {total_steps} optimizer steps: the LR warmup is shrunk to "
                f"{shrunk} steps (half the run). Lower {self.key('warmup_steps')} to silence this",
                category=UserWarning,
            )
            return shrunk
        return warmup


class WarmupCosineLR(LambdaLR):
    """The ``LambdaLR`` of :class:`WarmupCosine` factors, which follows this run's schedule on a resume.

    ``LambdaLR.load_state_dict`` would restore the checkpoint's factors, so a run continued with
    a larger ``max_steps`` would train on at the floor rate. Here the checkpoint's position
    (``last_epoch``) is kept and this run's schedule applies: an interrupted run resumed with the
    same settings continues exactly, and a finished run continued to more steps follows the
    longer schedule, as if it had been asked for from the start (the rate rises from the floor
    to that schedule's value at the resumed step). When the schedules differ a warning names
    both and the rate before and after.

    Args:
        optimizer, schedule: as ``LambdaLR(optimizer, schedule)`` (one factor for every group).
        names: how the warning names the settings (:attr:`CosmosConfig.names`).
    """

    def __init__(self, optimizer: Optimizer, schedule: Any, names: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        self._names = dict(names or {})
        super().__init__(optimizer, schedule, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured = [dataclasses.astuple(f) for f in self.lr_lambdas if isinstance(f, WarmupCosine)]
        super().load_state_dict(state_dict)
        factors = [f for f in self.lr_lambdas if isinstance(f, WarmupCosine)]
        restored = [dataclasses.astuple(f) for f in factors]
        if not restored or restored == configured:
            return
        step = self.last_epoch  # optimizer steps taken; the next one uses factor(step)
        before = factors[0](step)
        for factor, fields in zip(factors, configured):
            factor.warmup_steps, factor.total_steps, factor.min_lr_ratio = fields
        after = factors[0](step)
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        (w_old, t_old, rho_old), (w_new, t_new, rho_new) = restored[0], configured[0]
        total_key = self._names.get("total_steps", "Trainer(max_steps=...)")
        rank_zero_warn(
            f"The LR schedule saved in the checkpoint (warmup {w_old}, cosine to {rho_old} x lr at step {t_old}) "
            f"differs from this run's (warmup {w_new}, cosine to {rho_new} x lr at step {t_new}): this run's "
            f"applies from step {step + 1} on, at {after:.3g} x lr (the checkpoint's schedule gives {before:.3g} x lr "
            f"there). To resume on the checkpoint's schedule, set {total_key} and the warmup as that run did",
            category=UserWarning,
        )


def _label_groups(optimizer: Optimizer, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name the routed groups after what the optimizer really does with them.

    The routing calls the matrix group ``cosmos``; under an injected ``MuonAdamW`` that group is
    renamed ``muon``, under any other optimizer (``torch.optim.AdamW``) ``matrices``, and the
    algorithm column shows the optimizer's own algorithm. The live param groups are renamed too,
    so that ``LearningRateMonitor`` logs ``lr-AdamW/matrices``, not ``lr-AdamW/cosmos``.
    """
    if isinstance(optimizer, COSMOS):
        return groups
    from lit_cosmos.core.muon_adamw import MUON_ALGORITHMS, MuonAdamW

    is_muon = isinstance(optimizer, MuonAdamW)
    labelled = []
    for group in groups:
        matrices = group.get("name") == "cosmos"
        algorithm = ("muon" if group.get("algorithm") in MUON_ALGORITHMS else "adamw") if is_muon \
            else type(optimizer).__name__.lower()
        labelled.append({**group, "name": ("muon" if is_muon else "matrices") if matrices else group.get("name"),
                         "algorithm": algorithm})
    ids = {id(_first_tensor(g)): g["name"] for g in labelled if g["params"]}
    for live in optimizer.param_groups:
        if live.get("name") == "cosmos" and live["params"] and id(_first_tensor(live)) in ids:
            live["name"] = ids[id(_first_tensor(live))]
    return labelled


def _first_tensor(group: Mapping[str, Any]) -> Any:
    item = group["params"][0]
    return item[1] if isinstance(item, tuple) else item


class CosmosMixin:
    """Adds ``configure_optimizers`` (COSMOS + warmup-cosine) to a LightningModule.

    Put it first in the bases: ``class MyModel(CosmosMixin, L.LightningModule)``. Configure it
    with a class attribute ``cosmos_config = CosmosConfig(...)``, change the routing by overriding
    :meth:`cosmos_param_groups`, or inject ``optimizer`` / ``lr_scheduler`` attributes (see the
    module docstring for LightningCLI). The routing table is logged once, on rank zero.

    Raises:
        TypeError: at class creation when ``LightningModule`` precedes ``CosmosMixin`` in the
            bases (its ``configure_optimizers`` would silently win), or when ``cosmos_config`` is
            not a :class:`CosmosConfig`; in ``configure_optimizers`` when an injected
            ``optimizer`` / ``lr_scheduler`` is neither ``None`` nor callable, or returns the
            wrong type.
        ValueError: when the total steps are unknown or infinite, or the warmup does not fit.
    """

    cosmos_config: ClassVar[CosmosConfig] = CosmosConfig()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if LightningModule in mro and mro.index(LightningModule) < mro.index(CosmosMixin):
            raise TypeError(
                f"{cls.__qualname__}: CosmosMixin must come before LightningModule in the bases, "
                f"e.g. class {cls.__name__}(CosmosMixin, L.LightningModule); otherwise "
                "LightningModule.configure_optimizers wins and COSMOS is never used"
            )
        if not isinstance(cls.cosmos_config, CosmosConfig):
            raise TypeError(
                f"{cls.__qualname__}.cosmos_config must be a lit_cosmos.CosmosConfig, "
                f"got {type(cls.cosmos_config).__name__}"
            )

    def cosmos_param_groups(self) -> list[dict[str, Any]]:
        """The routed param groups handed to the optimizer. Override to change the routing.

        Default: :func:`lit_cosmos.cosmos_param_groups` with every ``cosmos_config`` field that is
        one of its keyword arguments (``overrides``, ``head_names``, ``conv``...); the groups carry
        no hyperparameters except the ``adamw_no_decay`` group's ``weight_decay=0``, so any
        injected optimizer accepts them.
        """
        cfg = self.cosmos_config
        module: nn.Module = self  # type: ignore[assignment]
        routing = {name: getattr(cfg, name) for name in _ROUTING_ARGS if hasattr(cfg, name)}
        return cosmos_param_groups(module, **routing)

    def cosmos_total_steps(self) -> int:
        """Total optimizer steps of the schedule: ``cosmos_config.max_steps`` or the trainer's estimate."""
        if self.cosmos_config.max_steps is not None:
            return self.cosmos_config.max_steps
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise ValueError(
                "the LR schedule needs the total steps: attach the module to a Trainer or set "
                f"{self.cosmos_config.key('max_steps')}"
            )
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the LR schedule needs a finite number of steps, but trainer.estimated_stepping_batches={total}: "
                f"set {self.cosmos_config.key('total_steps')} or {self.cosmos_config.key('max_steps')}"
            )
        return int(total)

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            check_strategy(trainer.strategy)
        cfg = self.cosmos_config
        groups = self.cosmos_param_groups()
        make_optimizer = self._cosmos_injected("optimizer")
        if make_optimizer is None:
            optimizer = cfg.build_optimizer(groups)
        else:
            optimizer = make_optimizer(groups)
            if not isinstance(optimizer, Optimizer):
                raise TypeError(
                    f"the injected optimizer {make_optimizer!r} returned {type(optimizer).__name__}, "
                    "not a torch Optimizer"
                )
        summary = routing_summary(_label_groups(optimizer, groups))

        make_scheduler = self._cosmos_injected("lr_scheduler")
        if make_scheduler is None:
            total = self.cosmos_total_steps()
            schedule = WarmupCosine(cfg.resolve_warmup(total), total, cfg.min_lr_ratio)
            scheduler = WarmupCosineLR(optimizer, schedule, names=cfg.names)
            scheduler_config: dict[str, Any] = {"scheduler": scheduler, "interval": "step"}
            schedule_txt = f"warmup {schedule.warmup_steps} steps, cosine to {cfg.min_lr_ratio} x lr at step {total}"
        else:
            scheduler = make_scheduler(optimizer)
            if isinstance(scheduler, ReduceLROnPlateau):
                if not getattr(scheduler, "monitor", None):
                    raise TypeError(
                        f"the injected lr_scheduler {make_scheduler!r} returned torch's ReduceLROnPlateau, which does "
                        "not say which logged metric it watches: inject lightning.pytorch.cli.ReduceLROnPlateau "
                        "(same arguments plus monitor=..., e.g. monitor='val/loss') instead"
                    )
                scheduler_config = {"scheduler": scheduler, "interval": "epoch", "monitor": scheduler.monitor}
            elif callable(getattr(scheduler, "step", None)) and hasattr(scheduler, "optimizer"):
                scheduler_config = {"scheduler": scheduler, "interval": "step"}
            else:
                raise TypeError(
                    f"the injected lr_scheduler {make_scheduler!r} returned {type(scheduler).__name__}, "
                    "not an LR scheduler"
                )
            schedule_txt = f"{type(scheduler).__name__} (injected), stepped every {scheduler_config['interval']}"

        if not getattr(self, "_cosmos_summary_logged", False):
            rank_zero_info(f"{type(self).__name__}: {type(optimizer).__name__}, {schedule_txt}\n{summary}")
            self._cosmos_summary_logged = True
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}

    def _cosmos_injected(self, name: str) -> Any:
        value = getattr(self, name, None)
        if isinstance(value, str) and "." in value:
            raise TypeError(
                f"{type(self).__name__}.{name} = {value!r} is a string, not a callable. jsonargparse passes a "
                "default function as its import path when the function has no return annotation: declare it "
                + (f"as `def {value.rsplit('.', 1)[-1]}(params) -> torch.optim.Optimizer:`" if name == "optimizer"
                   else f"as `def {value.rsplit('.', 1)[-1]}(optimizer) -> torch.optim.lr_scheduler.LRScheduler:`")
            )
        if value is not None and (not callable(value) or isinstance(value, nn.Module)):
            kind = "OptimizerCallable" if name == "optimizer" else "LRSchedulerCallable"
            raise TypeError(
                f"{type(self).__name__}.{name} = {value!r} is neither None nor callable: CosmosMixin uses an "
                f"attribute named {name!r} as an injected {kind}"
            )
        return value

