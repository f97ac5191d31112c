"""Muon on the matrices, AdamW on the rest, as ONE optimizer (torch only: no Lightning import here).

Lightning's automatic optimization steps one optimizer, and ``torch.optim.Muon`` refuses every
parameter that is not 2-D, so a model needs both algorithms in one object. :class:`MuonAdamW`
accepts the param groups of :func:`lit_cosmos.cosmos_param_groups` unchanged, which lets a config
swap :class:`lit_cosmos.COSMOS` for Muon on the same module.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import AdamW, Optimizer

from lit_cosmos.core.cosmos import saved_param_states
from lit_cosmos.core.kernels import NS_COEFFICIENTS

__all__ = ["MuonAdamW", "MUON_ALGORITHMS", "ADJUST_LR_FNS"]

#: ``algorithm`` values of a param group that get Muon (``"cosmos"``: a COSMOS-routed matrix group).
MUON_ALGORITHMS = ("muon", "cosmos")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
# Shape factors that depend on which side of the stored matrix is the output.
_ASYMMETRIC = (None, "original", "spectral_unclamped")


def _shard_placements(t: Tensor) -> tuple:
    """The ``Shard`` placements of a DTensor (empty for plain tensors and replicated DTensors)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return ()
    return tuple(p for p in placements if p.is_shard())


def _muon_class() -> type:
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise ImportError(f"MuonAdamW needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    return muon


class MuonAdamW(Optimizer):
    r"""``torch.optim.Muon`` on the matrix groups and ``torch.optim.AdamW`` on the others, in one optimizer.

    For a weight matrix :math:`W \in \mathbb{R}^{A\times B}` with gradient :math:`G` (Muon groups):

    .. math::
        B_t &= \mu B_{t-1} + (1-\mu) G, \qquad
        \tilde B_t = (1-\mu) G + \mu B_t \text{ (Nesterov) or } B_t \\
        O_t &= \mathrm{NS5}(\tilde B_t), \qquad
        W \leftarrow W (1 - \eta\lambda) - \eta\, s(A, B)\, O_t

    with :math:`s = 0.2\sqrt{\max(A, B)}` for ``adjust_lr_fn="match_rms_adamw"`` (the default
    here). :math:`O_t` has about :math:`\min(A, B)` singular values near 1 (Newton-Schulz leaves
    them in roughly [0.7, 1.2]), so the update's per-entry RMS is about :math:`0.17\,\eta`
    (measured 0.16-0.18), close to the exact :math:`0.2\,\eta` that COSMOS gives its matrices with
    its default ``lr_ratio=0.2``. One ``lr`` therefore serves the Muon and the AdamW groups, the
    same ``lr`` as COSMOS's, and a single LR schedule scales both. Every other group takes a
    decoupled-weight-decay AdamW step with learning rate :math:`\eta`.

    The maths is not re-implemented: the optimizer holds an inner ``torch.optim.Muon`` and an
    inner ``torch.optim.AdamW`` whose ``param_groups`` are this optimizer's own group dicts (the
    same objects) and whose ``state`` is this optimizer's ``state``. LR schedulers, gradient
    scalers and checkpoints see one ordinary optimizer; :meth:`load_state_dict` and unpickling
    re-link the inner optimizers to the loaded groups.

    DDP keeps parameters replicated, so it is the single-process maths. FSDP2 is refused with a
    clear error: ``torch.optim.Muon`` would receive row-sharded DTensors, whose Newton-Schulz is not
    the Newton-Schulz of the whole matrix (and which torch's in-place update cannot write back).
    Use :class:`lit_cosmos.COSMOS` there; its ``comm`` seam handles row shards, and
    ``COSMOS(rank=0)`` steps along Muon's direction.

    Group routing (by a group's ``algorithm`` key):

    - ``"muon"`` or ``"cosmos"`` (so the groups of :func:`lit_cosmos.cosmos_param_groups` work
      unchanged): Muon; every parameter must be 2-D. Stored as ``"muon"``. The routing's
      ``matrix_layout`` key: ``"linear"`` and ``"transposed"`` are taken as they are (Newton-Schulz
      commutes with transposition, :math:`\mathrm{NS}(X^\top) = \mathrm{NS}(X)^\top`, and so does
      the symmetric ``"match_rms_adamw"`` factor; the other ``adjust_lr_fn`` values read the stored
      shape and are refused for transposed groups); ``"stack"`` and ``"flatten"`` (3-D and more)
      and a ``split`` are refused with a ``ValueError`` saying what to route instead.
    - ``"adamw"``: AdamW.
    - absent: split like :class:`lit_cosmos.COSMOS`: 2-D parameters to Muon, the rest to AdamW.
      Embeddings and the output head are then on Muon too: prefer ``cosmos_param_groups``.

    Per-group keys: Muon groups carry ``lr``, ``weight_decay``, ``momentum``, ``nesterov``,
    ``ns_steps``, ``ns_coefficients``, ``eps`` (the Newton-Schulz normaliser, ``ns_eps``) and
    ``adjust_lr_fn``; AdamW groups carry ``lr``, ``betas``, ``eps``, ``weight_decay`` and AdamW's
    own flags. A group's own values win over the constructor's; keys meant for COSMOS only
    (``rank``, ``lr_ratio``, ``gamma``...) are kept and ignored.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts.
        lr: learning rate of the AdamW groups, and of the Muon groups unless ``muon_lr`` is given
            (default 2e-3, as COSMOS).
        muon_lr: learning rate of the Muon groups, before ``adjust_lr_fn`` (default: ``lr``).
            Keller Jordan's Muon uses about 0.02 with ``adjust_lr_fn="original"``.
        momentum: Muon's momentum :math:`\mu` (default 0.95, COSMOS's ``beta1``).
        nesterov: Nesterov momentum for Muon (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: quintic Newton-Schulz coefficients (default ``(3.4445, -4.7750, 2.0315)``).
        ns_eps: Newton-Schulz input normaliser, Muon's ``eps`` (default 1e-7).
        adjust_lr_fn: Muon's shape scaling: ``"match_rms_adamw"`` (default), ``"original"``,
            ``"spectral_unclamped"`` or ``None`` (= torch's default, ``"original"``).
        weight_decay: decoupled weight decay of both algorithms, multiplied by the group's ``lr``
            (default 0.1, as COSMOS; the ``adamw_no_decay`` routed group sets its own 0).
        adamw_betas: AdamW's ``(beta1, beta2)`` (default (0.9, 0.95), COSMOS's ``adamw_betas``).
        eps: AdamW's denominator epsilon (default 1e-8).

    Raises:
        ValueError: an invalid hyperparameter (the message names it), an unknown ``algorithm``,
            a Muon-group parameter that is not 2-D (an expert stack, a convolution), a Muon group with
            a ``split``, a transposed group with a shape-dependent ``adjust_lr_fn``, or no parameters.
        ImportError: torch without ``torch.optim.Muon`` (before 2.9).

    Example::

        from lit_cosmos import MuonAdamW, cosmos_param_groups

        opt = MuonAdamW(cosmos_param_groups(model), lr=2e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        muon_lr: Optional[float] = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        adjust_lr_fn: Optional[str] = "match_rms_adamw",
        weight_decay: float = 0.1,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> None:
        self._muon_cls = _muon_class()
        muon_defaults = dict(
            lr=lr if muon_lr is None else muon_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(float(c) for c in ns_coefficients) if _is_seq(ns_coefficients) else ns_coefficients,
            eps=ns_eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        adamw_defaults = dict(
            lr=lr,
            betas=tuple(float(b) for b in adamw_betas) if _is_seq(adamw_betas) else adamw_betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        names = {"lr": "muon_lr" if muon_lr is not None else "lr", "eps": "ns_eps"}
        _validate_muon(muon_defaults, where="the arguments", names=names)
        _validate_adamw(adamw_defaults, where="the arguments", names={"betas": "adamw_betas"})
        self._algorithm_defaults = {"muon": muon_defaults, "adamw": adamw_defaults}
        self._inners: dict[str, Optimizer] = {}
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError("MuonAdamW got an empty parameter list")
        # Only the keys every group has: the per-algorithm defaults are filled in add_param_group.
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        items = [group["params"]] if isinstance(group.get("params"), Tensor) else list(group["params"])
        where = f"param group {group.get('name', len(self.param_groups))!r}"
        alg = group.get("algorithm")
        if alg is None:
            matrices = [x for x in items if _tensor(x).ndim == 2]
            others = [x for x in items if _tensor(x).ndim != 2]
            for alg, chosen in (("muon", matrices), ("adamw", others)):
                if chosen:
                    self.add_param_group(dict(group, params=chosen, algorithm=alg))
            return
        if alg in MUON_ALGORITHMS:
            alg = "muon"
            layout = group.get("matrix_layout")
            if group.get("split") is not None:
                raise ValueError(
                    f"MuonAdamW cannot split matrices: {where} has split={group['split']!r}, but torch.optim.Muon "
                    "orthogonalises each parameter as one matrix; drop split= from cosmos_param_groups, or use "
                    "lit_cosmos.COSMOS"
                )
            for item in items:
                if _tensor(item).ndim != 2 and layout == "stack":
                    label = f"{item[0]!r} " if isinstance(item, tuple) else ""
                    raise ValueError(
                        f"Muon needs 2-D matrices: parameter {label}of shape {tuple(_tensor(item).shape)} in {where} "
                        "is an expert stack (matrix_layout='stack'), and torch.optim.Muon has no per-expert path; "
                        "route the stacks to AdamW (cosmos_param_groups(..., stacks='adamw')) or use lit_cosmos.COSMOS"
                    )
                if _tensor(item).ndim != 2:
                    label = f"{item[0]!r} " if isinstance(item, tuple) else ""
                    raise ValueError(
                        f"Muon needs 2-D matrices: parameter {label}of shape {tuple(_tensor(item).shape)} is in "
                        f"{where} (algorithm={group['algorithm']!r}); route it to 'adamw' "
                        "(e.g. cosmos_param_groups(..., conv='adamw'))"
                    )
                placements = _shard_placements(_tensor(item))
                if placements:
                    label = f"{item[0]!r} " if isinstance(item, tuple) else ""
                    raise ValueError(
                        f"MuonAdamW cannot take parameter {label}of shape {tuple(_tensor(item).shape)} in {where}: "
                        f"it is a DTensor sharded as {placements} (FSDP2), and torch.optim.Muon's Newton-Schulz "
                        "needs whole matrices. Use lit_cosmos.COSMOS, whose comm seam handles row shards "
                        "(COSMOS(rank=0) steps along Muon's direction), or DDP"
                    )
        elif alg != "adamw":
            raise ValueError(f"invalid algorithm={alg!r} in {where}: must be one of {MUON_ALGORITHMS + ('adamw',)}")
        group["algorithm"] = alg
        group["params"] = items
        for key, value in self._algorithm_defaults[alg].items():
            group.setdefault(key, value)
        if _is_seq(group.get("betas")):
            group["betas"] = tuple(float(b) for b in group["betas"])
        (_validate_muon if alg == "muon" else _validate_adamw)(group, where=where, names={})
        if alg == "muon" and group.get("matrix_layout") == "transposed" and group["adjust_lr_fn"] in _ASYMMETRIC:
            raise ValueError(
                f"adjust_lr_fn={group['adjust_lr_fn']!r} in {where}: torch.optim.Muon scales by the stored shape "
                "(rows / columns), and these weights are stored transposed (in, out), so they would get the "
                "factor of their transpose; use adjust_lr_fn='match_rms_adamw', which is symmetric"
            )
        super().add_param_group(group)
        self._link()

    def _link(self) -> None:
        """Point the inner Muon / AdamW at this optimizer's groups (shared dicts) and state."""
        for alg, cls in (("muon", self._muon_cls), ("adamw", AdamW)):
            groups = [g for g in self.param_groups if g["algorithm"] == alg]
            inner = self._inners.get(alg)
            if inner is None:
                if not groups:
                    continue
                # The constructor fills the algorithm's remaining defaults (AdamW's amsgrad,
                # foreach, ...) into the shared dicts; its own lr etc. are never used.
                inner = self._inners[alg] = cls(groups)
            for g in groups:
                for key, value in inner.defaults.items():
                    g.setdefault(key, value)
            inner.param_groups = groups
            inner.state = self.state

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_algorithm_defaults": self._algorithm_defaults}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Muon's and AdamW's per-parameter tensors (momentum_buffer, exp_avg, exp_avg_sq...) all
        # have the parameter's shape: a state of another model is refused before anything loads.
        for index, _, p, pid, st in saved_param_states(self.param_groups, state_dict):
            for key, value in st.items():
                if isinstance(value, Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"cannot load the optimizer state: parameter {pid} of param group {index} has shape "
                        f"{tuple(p.shape)} but its saved {key!r} has shape {tuple(value.shape)}; the state "
                        "was saved for a different model or routing. Nothing was loaded."
                    )
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also the last act of load_state_dict, which builds new group dicts and a new state.
        super().__setstate__(state)
        self.__dict__.setdefault("_inners", {})
        self.__dict__.setdefault("_muon_cls", _muon_class())
        self._link()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inners.values():
            inner.step()
        return loss


# ---------------------------------------------------------------------- validation
def _is_seq(x: Any) -> bool:
    return isinstance(x, (tuple, list))


def _tensor(item: Any) -> Tensor:
    return item[1] if isinstance(item, tuple) else item


def _number(group: dict, key: str, where: str, names: dict, low: float = 0.0, high: float = math.inf) -> None:
    v = group[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"invalid {names.get(key, key)}={v!r} in {where}: must be a finite number {span}")


def _validate_muon(group: dict, where: str, names: dict) -> None:
    for key in ("lr", "weight_decay", "eps"):
        _number(group, key, where, names)
    _number(group, "momentum", where, names, high=1.0)
    if group["momentum"] == 1.0:
        raise ValueError(f"invalid momentum=1.0 in {where}: must be < 1")
    v = group["ns_steps"]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 100:
        raise ValueError(f"invalid ns_steps={v!r} in {where}: must be an int in [0, 100)")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"invalid nesterov={group['nesterov']!r} in {where}: must be a bool")
    c = group["ns_coefficients"]
    if not _is_seq(c) or len(c) != 3:
        raise ValueError(f"invalid ns_coefficients={c!r} in {where}: must be three numbers (a, b, c)")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"invalid adjust_lr_fn={group['adjust_lr_fn']!r} in {where}: must be one of {ADJUST_LR_FNS}")


def _validate_adamw(group: dict, where: str, names: dict) -> None:
    for key in ("lr", "weight_decay", "eps"):
        _number(group, key, where, names)
    betas = group["betas"]
    if not _is_seq(betas) or len(betas) != 2:
        raise ValueError(f"invalid {names.get('betas', 'betas')}={betas!r} in {where}: must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            label = names.get("betas", "betas")
            raise ValueError(f"invalid beta{i + 1}={b!r} ({label}={tuple(betas)!r}) in {where}: must be in [0, 1)")
