"""The COSMOS optimizer class (torch only: no Lightning import here).

A thin :class:`torch.optim.Optimizer`: it validates arguments, builds state lazily, buckets the
matrices and hands stacks of tensors to the functional core, :mod:`lit_cosmos.core.direction`.
How partial products are summed across processes is the business of the distributed seam
(:mod:`lit_cosmos.distributed`), which the optimizer calls and which never calls back into it.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lit_cosmos.core import kernels as F
from lit_cosmos.core.direction import cosmos_direction
from lit_cosmos.core.matrices import DEFAULT_RANK, MatrixView, group_view
from lit_cosmos.distributed import Comm, LocalComm, is_distributed, is_dtensor, local_tensor, resolve_comm

__all__ = ["COSMOS", "ALGORITHMS", "NS_DTYPES", "saved_param_states"]

ALGORITHMS = ("cosmos", "adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: ``state_dtype`` values: storage of the moments (``M``, ``V``; AdamW's ``exp_avg``, ``exp_avg_sq``).
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: State tensors stored in a group's ``state_dtype``; every other one in the compute dtype.
MOMENT_KEYS = ("M", "V", "exp_avg", "exp_avg_sq")
ON_NONFINITE = ("raise", "skip", "off")


def saved_param_states(param_groups: list[dict], state_dict: dict[str, Any]) -> list[tuple[int, dict, Tensor, Any, dict]]:
    """Pair an optimizer's parameters with a saved ``state_dict``'s entries, the way
    ``Optimizer.load_state_dict`` does (by position): ``(group index, saved group, parameter,
    saved id, saved state or {})``. Empty when the group or parameter counts differ (torch then
    raises its own error)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(param_groups) != len(saved_groups) or any(
        len(g["params"]) != len(sg["params"]) for g, sg in zip(param_groups, saved_groups)
    ):
        return []
    saved_state = state_dict.get("state", {})
    return [
        (index, saved, p, pid, saved_state.get(pid) or {})
        for index, (group, saved) in enumerate(zip(param_groups, saved_groups))
        for p, pid in zip(group["params"], saved["params"])
    ]


def _compute_dtype(p: Tensor) -> torch.dtype:
    """float32 maths for every parameter dtype, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _storage_dtype(group: dict, p: Tensor, key: str) -> torch.dtype:
    """The dtype state tensor ``key`` of ``p`` is stored in: the compute dtype, or for the
    moments of a ``state_dtype="bfloat16"`` group bfloat16."""
    if key in MOMENT_KEYS and group.get("state_dtype", "float32") == "bfloat16":
        return torch.bfloat16
    return _compute_dtype(p)


class COSMOS(Optimizer):
    r"""COSMOS: SOAP/Adam inside the leading gradient eigensubspace, Muon on the rest.

    For a weight matrix :math:`W \in \mathbb{R}^{m\times n}` (``nn.Linear`` layout) with gradient
    :math:`G`, step :math:`t`, :math:`r=\min(\text{rank}, m, n)`:

    .. math::
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        U &\leftarrow \text{top-}r\text{ eigenvectors of } G^\top G
            \quad\text{(first step)} \\
        U' &\leftarrow \mathrm{QR}\big(\beta_2 U S + (1-\beta_2) G^\top G U\big),\;
            T = U^\top U',\;
            S \leftarrow \beta_2 T^\top S T + (1-\beta_2) (GU')^\top (GU')
            \quad\text{(refresh: } t \bmod \text{update\_interval} = 0) \\
        S &\leftarrow \beta_2 S + (1-\beta_2)(GU)^\top(GU) \quad\text{(other steps)} \\
        V &\leftarrow \beta_2 V + (1-\beta_2) (GU)^{\odot 2} \\
        X &= \frac{(1-\beta_1) G + \beta_1 M}{1-\beta_1^{t+1}} \text{ (Nesterov) or }
             \frac{M}{1-\beta_1^t} \\
        A &= \frac{XU}{\sqrt{V/(1-\beta_2^t)}+\epsilon}\,U^\top, \qquad
        R = X - XUU^\top, \qquad B = \frac{\mathrm{NS5}(R/\|R\|_F)}{\|\mathrm{NS5}(R/\|R\|_F)\|_F} \\
        \tilde G &= A + \gamma\sqrt{mn}\,B \\
        W &\leftarrow W(1-\eta\lambda) - \eta_{\text{ratio}}\,\eta\,\sqrt{mn}\,
             \tilde G / \|\tilde G\|_F

    so every matrix update has per-entry RMS exactly ``lr_ratio * lr``. Parameters in groups with
    ``algorithm="adamw"`` (embeddings, output head, norms, biases) get decoupled-weight-decay
    AdamW with learning rate ``lr``. All maths is float32 whatever the parameter dtype; only
    Newton-Schulz runs in ``ns_dtype``.

    State per matrix: ``step``, ``M`` (m x n), ``U`` (n x r), ``S`` (r x r), ``V`` (m x r):
    ``mn + mr + nr + r^2`` elements (AdamW: ``2mn``). State per AdamW parameter: ``step``,
    ``exp_avg``, ``exp_avg_sq``. All state is float32 (``state_dtype`` can store the moments in
    bf16) and contiguous. A param group's ``matrix_layout`` and ``split`` say which matrices a
    parameter holds (expert stacks, transposed ``Conv1D`` weights, fused weights as their parts:
    :mod:`lit_cosmos.core.matrices`); each gets its own basis.

    Matrices of the same shape in a group are stacked and processed by batched matmul / QR /
    Newton-Schulz calls.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs, or of param-group
            dicts. Groups may set ``algorithm`` (``"cosmos"`` or ``"adamw"``) and any
            hyperparameter below. A group without ``algorithm`` is split: 2-D parameters get
            COSMOS, all others AdamW. :func:`lit_cosmos.cosmos_param_groups` routes a model
            properly (embeddings and the output head on AdamW) and is the recommended input.
        lr: learning rate of the AdamW groups and base of the matrix rate (default 2e-3).
        lr_ratio: matrix updates have per-entry RMS ``lr_ratio * lr`` (default 0.2).
        betas: ``(beta1, beta2)`` of the COSMOS groups (default (0.95, 0.95)).
        rank: subspace rank ``r`` (clipped to ``min(m, n)``; 0 gives a Muon step; default 64).
            Fixed for a matrix at its first step.
        gamma: weight of the Newton-Schulz part before the final normalisation (default 0.2).
        eps: added to the Adam denominators (default 1e-8).
        weight_decay: decoupled weight decay, multiplied by ``lr`` (default 0.1).
        nesterov: use the Nesterov momentum ``X`` (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: ``"bfloat16"`` (default) or ``"float32"``: Newton-Schulz compute dtype. On CPUs
            without bf16 dot products (AVX2 only) bf16 GEMMs are emulated at float32 speed.
        update_interval: refresh the basis every this many steps (default 1 = every step, as the
            paper); 0 refreshes only when :meth:`request_refresh` asks.
        power_iters: power iterations per refresh (default 1).
        adamw_betas: the ``betas`` default of AdamW groups (default (0.9, 0.95)).
        on_nonfinite: a NaN/Inf gradient ``"raise"`` (default) a ``FloatingPointError`` with
            state and parameters untouched, ``"skip"`` the whole step likewise, or ``"off"``
            skips the check (saves one host sync per step, e.g. under a GradScaler).
        compile: ``torch.compile`` the whole per-bucket update (state updates, subspace
            products, Newton-Schulz, combination): one graph per bucket shape and step kind.
            Helps on GPUs; compilation takes a while on the first steps (default False).
        batch: stack matrices of the same shape into batched matmul / QR / Newton-Schulz calls.
            ``None`` (default): on accelerators yes; on CPUs no, where one 2-D GEMM per matrix
            measured faster than a batched one and stacking only adds copies.
        comm: the communication seam (:mod:`lit_cosmos.comm`). ``"auto"`` (default) picks it from
            the parameters: plain tensors run single-process (right under DDP too, where every
            rank computes every update), DTensors sharded by rows run the FSDP2 path.
            ``"ddp_split"`` splits the matrix work across DDP ranks (see
            :mod:`lit_cosmos.distributed`); ``"local"`` forces one process.

        state_dtype: ``"float32"`` (default) or ``"bfloat16"``: storage of the moments ``M``,
            ``V`` and the AdamW groups' ``exp_avg``, ``exp_avg_sq``, updated in float32 and
            written back by stochastic rounding (exact in expectation; round-to-nearest would
            freeze averages whose steps are below half a bf16 unit). ``U`` and ``S`` stay
            float32. A checkpoint loads into either storage; this optimizer's choice is kept.
        subspace_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"tf32"``: input precision
            of the ``m x n x r`` products (``G U``, ``G^T (G U)``, ``X U``, ``Y U^T``), always
            accumulated in float32 (:class:`lit_cosmos.core.kernels.Products`); QR, ``eigh``,
            ``S`` and Newton-Schulz are unaffected. Native on CUDA, emulated elsewhere (for
            measurement: no speed). See docs/algorithm.md for the measured error.

    Raises:
        ValueError: for an invalid hyperparameter, algorithm, or a COSMOS parameter with
            fewer than 2 dimensions (the message names the value).
        RuntimeError: for a sparse gradient.
        FloatingPointError: for a non-finite gradient with ``on_nonfinite="raise"``.

    Example::

        model = MyTransformer()
        opt = COSMOS(cosmos_param_groups(model), lr=2e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        lr_ratio: float = 0.2,
        betas: tuple[float, float] = (0.95, 0.95),
        rank: int = DEFAULT_RANK,
        gamma: float = 0.2,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        update_interval: int = 1,
        power_iters: int = 1,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        on_nonfinite: str = "raise",
        compile: bool = False,
        batch: Optional[bool] = None,
        comm: "Comm | str | None" = "auto",
        state_dtype: str = "float32",
        subspace_dtype: str = "float32",
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        self._adamw_betas = tuple(adamw_betas)
        defaults = dict(
            lr=lr,
            lr_ratio=lr_ratio,
            betas=tuple(betas),
            rank=rank,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            update_interval=update_interval,
            power_iters=power_iters,
            state_dtype=state_dtype,
            subspace_dtype=subspace_dtype,
        )
        _validate(dict(defaults, algorithm="cosmos"), where="the arguments")
        _validate(dict(defaults, betas=self._adamw_betas, algorithm="adamw"), where="the arguments (adamw_betas)")
        if batch not in (None, True, False):
            raise ValueError(f"batch must be None, True or False, got {batch!r}")
        self.on_nonfinite = on_nonfinite
        self.batch = batch
        #: True when the last ``step()`` was skipped for a non-finite gradient (``on_nonfinite="skip"``).
        self.last_step_skipped = False
        self._refresh_request: Optional[int] = None
        self._compile = bool(compile)
        self._comm_spec = comm
        self._direction = _compiled_direction() if compile else cosmos_direction
        super().__init__(list(params) if not isinstance(params, Tensor) else [params], defaults)
        self._comm = resolve_comm(comm, [p for g in self.param_groups for p in g["params"]])
        self._bind_comm()

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if isinstance(group.get("params"), Tensor):
            group["params"] = [group["params"]]
        if isinstance(group.get("params"), (set, frozenset)):
            raise TypeError("COSMOS parameters must be an ordered collection (a list), not a set: the order of a set "
                            "changes between runs and state_dict() refers to parameters by position")
        items = list(group["params"])
        for item in items:
            name, p = item if isinstance(item, tuple) else (None, item)
            if isinstance(p, Tensor) and p.is_complex():
                label = f"{name!r} " if name else ""
                raise ValueError(f"COSMOS does not support complex parameters: parameter {label}of shape "
                                 f"{tuple(p.shape)} has dtype {p.dtype}")
        if group.get("algorithm") is None:
            # Plain parameters: route by dimension (2-D -> cosmos, everything else -> adamw).
            def ndim(item: Any) -> int:
                return (item[1] if isinstance(item, tuple) else item).ndim

            matrices = [x for x in items if ndim(x) == 2]
            others = [x for x in items if ndim(x) != 2]
            for alg, chosen in (("cosmos", matrices), ("adamw", others)):
                if chosen:
                    self.add_param_group(dict(group, params=chosen, algorithm=alg))
            return
        group["params"] = items
        alg = group["algorithm"]
        if alg == "adamw":
            group.setdefault("betas", self._adamw_betas)
        merged = {**self.defaults, **group}
        _validate(merged, where=f"param group {group.get('name', len(self.param_groups))!r}")
        if alg == "cosmos":
            for item in items:
                name, p = item if isinstance(item, tuple) else (None, item)
                label = f"{name!r} " if name else ""
                if p.ndim < 2:
                    raise ValueError(
                        f"COSMOS needs matrices: parameter {label}of shape {tuple(p.shape)} is in an "
                        "algorithm='cosmos' group; put it in an algorithm='adamw' group"
                    )
                view = group_view(group, p)
                if is_dtensor(p) and (view.layout == "transposed" or len(view.parts) > 1):
                    what = "matrix_layout='transposed'" if view.layout == "transposed" else f"split={group['split']!r}"
                    raise ValueError(
                        f"COSMOS cannot take the FSDP2 (DTensor) parameter {label}of shape {tuple(p.shape)} with "
                        f"{what}: fully_shard shards dim 0, which is not the rows of its matrix view "
                        f"({view.describe()}). Under FSDP2 use nn.Linear-layout weights without split, or DDP"
                    )
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        super().add_param_group(group)
        if "_comm" in self.__dict__:  # a group added after construction
            self._bind_comm()

    #: Settings beyond torch's ``defaults``/``state``/``param_groups`` that copies and pickles keep.
    _PICKLED = ("on_nonfinite", "batch", "last_step_skipped", "_refresh_request", "_adamw_betas", "_compile",
                "_comm_spec")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self._PICKLED if key in self.__dict__})
        if not isinstance(state.get("_comm_spec"), str):
            state["_comm"] = self._comm  # a Comm object given by the caller travels as it is
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling and copying, and the last act of load_state_dict (state and groups only).
        super().__setstate__(state)
        self.__dict__.setdefault("_refresh_request", None)
        self.__dict__.setdefault("on_nonfinite", "raise")
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("batch", None)
        self.__dict__.setdefault("_adamw_betas", (0.9, 0.95))
        self.__dict__.setdefault("_compile", False)
        self.__dict__.setdefault("_comm_spec", "auto")
        if "_direction" not in self.__dict__:
            self._direction = _compiled_direction() if self._compile else cosmos_direction
        if "_comm" not in self.__dict__:
            # e.g. "ddp_split" or "auto" (FSDP2 for DTensor parameters), for the copy's parameters
            self._comm = resolve_comm(self._comm_spec, [p for g in self.param_groups for p in g["params"]])
        self._bind_comm()

    def _bind_comm(self) -> None:
        """Tell the distributed seam which matrices this optimizer steps (param-group order)."""
        pairs = [(g, p) for g in self.param_groups if g["algorithm"] == "cosmos" for p in g["params"]]
        self._comm.bind([p for _, p in pairs], [group_view(g, p).ns_cost() for g, p in pairs])

    def _build_state(self, p: Tensor) -> dict[str, Tensor]:
        """The empty (zero) state of one COSMOS matrix, with its group's layout and rank."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        st: dict[str, Tensor] = {}
        self._init_cosmos_state(p, st, group_view(group, p), group)
        return st

    def state_dict(self) -> dict[str, Any]:
        # Under DDP work split the state of a matrix lives on its owner: consolidate first.
        self._comm.consolidate(self.state, self._build_state)
        try:
            return super().state_dict()
        finally:
            self._comm.drop_unowned(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_state(state_dict)  # before anything changes: a bad file corrupts nothing
        for index, (group, saved) in enumerate(zip(self.param_groups, state_dict.get("param_groups", []))):
            if group["algorithm"] == "cosmos" and saved.get("rank", group["rank"]) != group["rank"]:
                warnings.warn(
                    f"COSMOS.load_state_dict: param group {index} has rank={group['rank']}, the loaded state "
                    f"rank={saved['rank']}; the loaded rank and bases are kept (a matrix's rank is fixed at its "
                    "first step)",
                    UserWarning,
                    stacklevel=2,
                )
        # torch casts the loaded state to each parameter's dtype, which would round COSMOS's
        # float32 state of bf16/fp16 parameters: keep the saved tensors and take them back after.
        originals = {p: st for _, _, p, _, st in saved_param_states(self.param_groups, state_dict)}
        # state_dtype is this optimizer's storage choice, not a hyperparameter of the run: the
        # groups keep theirs, and the loaded tensors are converted to it below.
        storage = [g.get("state_dtype", "float32") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, dtype in zip(self.param_groups, storage):
            group["state_dtype"] = dtype
            # A full-state FSDP2 load (torch.distributed.checkpoint's broadcast from rank 0) hands
            # tuples back as lists: keep the groups exactly as add_param_group makes them.
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        # Each state tensor in its storage dtype: a float32 checkpoint loads into a bf16-state
        # optimizer (rounded to nearest once) and a bf16 one into a float32-state optimizer.
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, st in self.state.items():
            source = originals.get(p, {})
            for key, value in st.items():
                if key == "step" or not isinstance(value, Tensor):
                    continue
                want = _storage_dtype(group_of[p], p, key) if p in group_of else _compute_dtype(p)
                saved = source.get(key)
                if isinstance(saved, Tensor) and saved.is_floating_point() and saved.dtype != value.dtype:
                    st[key] = saved.to(device=value.device, dtype=want)  # the unrounded saved values
                elif value.dtype != want:
                    st[key] = value.to(want)
        self._comm.drop_unowned(self.state)

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` when a saved per-parameter state does not fit its parameter (a
        checkpoint of another model): torch would load it and fail obscurely on the next step.
        Mismatched group or parameter counts are left to torch's own error."""
        for index, saved, p, pid, st in saved_param_states(self.param_groups, state_dict):
            if not st:
                continue
            algorithm = saved.get("algorithm", self.param_groups[index]["algorithm"])
            shape = tuple(p.shape)
            if algorithm == "cosmos":
                view = group_view(self.param_groups[index], p)
                U = st.get("U")
                r = U.shape[-1] if isinstance(U, Tensor) and U.ndim >= 2 else -1
                want: dict[str, Any] = view.state_shapes(r)
                largest = view.rank(view.n)  # min(n, rows of every part)
                if not 0 <= r <= largest:
                    lead = ", ".join(map(str, view.state_shapes(0)["U"][:-1]))
                    name = "(n, r)" if len(view.state_shapes(0)["U"]) == 2 else "U"
                    want["U"] = f"{name} = ({lead}, r) with r <= min(m, n) = {largest}"
            else:
                want = {"exp_avg": shape, "exp_avg_sq": shape}
            for key, expected in want.items():
                value = st.get(key)
                got = tuple(value.shape) if isinstance(value, Tensor) else None
                if got != expected:
                    found = f"shape {got}" if got is not None else "no such tensor"
                    raise ValueError(
                        f"cannot load the optimizer state: parameter {pid} of param group {index} "
                        f"({algorithm}, parameter shape {shape}) has saved {key!r} of {found}, expected "
                        f"{expected}; the state was saved for a different model or routing. Nothing "
                        "was loaded."
                    )

    def request_refresh(self, power_iters: Optional[int] = None) -> None:
        """Refresh the basis of every COSMOS matrix on the next step, with ``power_iters`` power
        iterations (default: each group's ``power_iters``). A matrix's first step always builds
        its basis from scratch instead. The request waits for the next step that is taken (a
        step skipped or refused for a non-finite gradient does not consume it). Used by
        :class:`lit_cosmos.callbacks.EigenbasisRefresh`."""
        if power_iters is not None and (not isinstance(power_iters, int) or power_iters < 1):
            raise ValueError(f"power_iters must be a positive int, got {power_iters!r}")
        # 0 stands for "each group's own power_iters" (see _cosmos_bucket)
        self._refresh_request = power_iters if power_iters is not None else 0

    @property
    def refresh_requested(self) -> bool:
        return self._refresh_request is not None

    def matrix_states(self) -> Iterable[tuple[dict, Tensor, dict]]:
        """Yield ``(group, param, state)`` for every COSMOS matrix whose basis exists on this rank.

        Rank-local: under ``comm="ddp_split"`` only the matrices this rank owns have state, and
        under FSDP2 ``M``/``V`` are DTensors (use :func:`lit_cosmos.comm.local_tensor`).
        """
        for group in self.param_groups:
            if group["algorithm"] != "cosmos":
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if st and self._step_count(p, st) > 0:
                    yield group, p, st

    def _describe_nonfinite(self) -> str:
        """Name the first parameter with a non-finite gradient on this rank (error path only)."""
        for i, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for j, (name, p) in enumerate(zip(names, group["params"])):
                g = local_tensor(p.grad) if p.grad is not None else None
                if g is not None and g.numel() and not bool(torch.isfinite(g).all()):
                    label = repr(name) if name else f"#{j} of param group {i}"
                    return f" for parameter {label} of shape {tuple(p.shape)}"
        if is_distributed():
            return " on another rank (or a gradient so large that its float32 sum overflows)"
        return " (no entry is NaN/Inf here: a gradient so large that its float32 sum overflows)"

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"COSMOS does not support sparse gradients (parameter of shape {tuple(p.shape)})")
                grads.append(local_tensor(p.grad))
        self._check_views()
        if self.on_nonfinite != "off" and grads and not self._comm.all_finite(grads):
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"COSMOS got a non-finite (NaN or Inf) gradient{self._describe_nonfinite()}; the step "
                    "was not taken and the optimizer state is unchanged. Pass on_nonfinite='skip' to "
                    "skip such steps."
                )
            self.last_step_skipped = True
            return loss  # skipped: a pending refresh request waits for the next real step
        self.last_step_skipped = False

        request, self._refresh_request = self._refresh_request, None
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                self._adamw_group(group)
            else:
                self._cosmos_group(group, request)
        self._comm.after_step(
            [p for g in self.param_groups if g["algorithm"] == "cosmos" for p in g["params"] if p.grad is not None]
        )
        return loss

    def _check_views(self) -> None:
        """Before anything changes: every COSMOS matrix's ``matrix_layout`` / ``split`` fits it
        and its existing state (a group edited after the first step would misread the state)."""
        for group in self.param_groups:
            if group["algorithm"] != "cosmos":
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if p.grad is None or not st:
                    continue
                view = group_view(group, p)
                r = st["U"].shape[-1]
                want = view.state_shapes(r)
                for key in ("U", "V"):
                    if tuple(st[key].shape) != want[key]:
                        raise ValueError(
                            f"param group {group.get('name', self.param_groups.index(group))!r} now sees the parameter "
                            f"of shape {tuple(p.shape)} as {view.describe() or view.layout} (matrix_layout="
                            f"{group.get('matrix_layout', 'auto')!r}, split={group.get('split')!r}), which needs "
                            f"{key} of shape {want[key]}, but its state holds {tuple(st[key].shape)}: a matrix's "
                            "layout and split are fixed at its first step. Nothing was changed."
                        )

    def _adamw_group(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                self._count_step(p, st, 0)
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = torch.zeros_like(p, dtype=_storage_dtype(group, p, key),
                                               memory_format=torch.contiguous_format)
            buckets[(p.device, p.dtype, self._step_count(p, st))].append(p)
        for (_, dtype, step), ps in buckets.items():
            t = step + 1
            states = [self.state[p] for p in ps]
            for p, st in zip(ps, states):
                st["step"].fill_(t)
                self._count_step(p, st, t)
            params = [local_tensor(p) for p in ps]
            grads = [local_tensor(p.grad).to(_compute_dtype(p)) for p in ps]
            stored_m = [local_tensor(st["exp_avg"]) for st in states]
            stored_v = [local_tensor(st["exp_avg_sq"]) for st in states]
            low = stored_m[0].dtype != grads[0].dtype  # bf16 moments: float32 maths, rounded back
            m = [x.to(g.dtype) for x, g in zip(stored_m, grads)] if low else stored_m
            v = [x.to(g.dtype) for x, g in zip(stored_v, grads)] if low else stored_v
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            if low:
                for p, dst_m, src_m, dst_v, src_v in zip(ps, stored_m, m, stored_v, v):
                    generator = self._rounding_generator(p, t)
                    F.stochastic_round_(dst_m, src_m, generator)
                    F.stochastic_round_(dst_v, src_v, generator)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
            torch._foreach_add_(denom, eps)
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            step_size = lr / (1.0 - beta1**t)
            if dtype in (torch.float32, torch.float64):
                torch._foreach_addcdiv_(params, m, denom, value=-step_size)
            else:
                updates = torch._foreach_div(m, denom)
                for p, u in zip(params, updates):
                    p.add_(u.to(dtype), alpha=-step_size)

    def _rounding_generator(self, p: Tensor, t: int, part: int = 0) -> torch.Generator:
        """The random bits of the stochastic rounding of ``p``'s moments at step ``t``: seeded by
        (step, position of ``p`` in the optimizer, part), so a resumed run rounds exactly as an
        uninterrupted one, with no random state to save."""
        device = local_tensor(p).device
        generators = self.__dict__.setdefault("_generators", {})
        generator = generators.get(device)
        if generator is None:
            generator = generators[device] = torch.Generator(device=device)
        position = self._positions().get(id(p), 0)
        generator.manual_seed((int(t) * 1_000_003 + position * 131 + part) & 0x7FFF_FFFF_FFFF_FFFF)
        return generator

    def _positions(self) -> dict[int, int]:
        positions = self.__dict__.get("_position_of")
        if positions is None or len(positions) != sum(len(g["params"]) for g in self.param_groups):
            flat = [p for g in self.param_groups for p in g["params"]]
            positions = self.__dict__["_position_of"] = {id(p): i for i, p in enumerate(flat)}
        return positions

    def _cosmos_group(self, group: dict, request: Optional[int]) -> None:
        # Bucket the matrices of every parameter: a parameter contributes one "slot" per matrix
        # (experts of a stack, parts of a split weight); slots of the same shape, rank, device,
        # dtype and step share a bucket (one bucket per parameter on CPUs, see ``batch``).
        buckets: dict[tuple, list[_Slots]] = defaultdict(list)
        pending: dict[int, _Pending] = {}
        for p in group["params"]:
            if p.grad is None or not self._comm.computes(p):
                continue
            view = group_view(group, p)
            st = self.state[p]
            if not st:
                self._init_cosmos_state(p, st, view, group)
                self._count_step(p, st, 0)
            r = st["U"].shape[-1]
            local = local_tensor(p)
            sharded_rows = is_dtensor(p) and view.layout != "stack"
            m_local = local.shape[0] if sharded_rows else view.m
            batch = self.batch if self.batch is not None else p.device.type != "cpu"
            runs = _part_runs(view.parts)
            pending[id(p)] = _Pending(p, view, len(runs))
            for first, count, rows in runs:
                key = (rows, m_local if sharded_rows else rows, view.n, r, sharded_rows, p.device, p.dtype,
                       self._step_count(p, st), None if batch else id(p))
                buckets[key].append(_Slots(p, view, first, count))
        lr = group["lr"]
        for (rows, m_local, n, r, sharded_rows, _, _, step, _), slots in buckets.items():
            comm = self._comm if sharded_rows else _LOCAL
            directions = self._cosmos_bucket(group, slots, rows, m_local, n, r, int(step), request, comm)
            done = []
            for slot, D in zip(slots, directions):
                entry = pending[id(slot.p)]
                entry.parts[slot.first] = D
                if len(entry.parts) == entry.runs:
                    done.append(entry)
            self._apply(done, lr, group["weight_decay"], group["lr_ratio"])
        for p in group["params"]:
            if id(p) in pending:
                st = self.state[p]
                count = self._step_count(p, st)
                st["step"].add_(1)
                self._count_step(p, st, count + 1)

    def _apply(self, entries: list["_Pending"], lr: float, weight_decay: float, lr_ratio: float) -> None:
        """``W <- W (1 - lr wd) - lr_ratio lr D`` for the parameters whose parts are all computed
        (two multi-tensor kernels for a bucket)."""
        params, updates = [], []
        for entry in entries:
            view, p = entry.view, local_tensor(entry.p)
            if p.numel() == 0:
                continue
            batch = p.shape[0] if view.layout == "stack" else 1
            # Each run of parts is (batch * count, rows, n): back to (batch, count * rows, n), in order.
            runs = [entry.parts[k].reshape(batch, -1, view.n) for k in sorted(entry.parts)]
            D = runs[0] if len(runs) == 1 else torch.cat(runs, dim=-2)
            params.append(p)
            updates.append(view.from_matrices(D, p.shape).to(p.dtype))
        if not params:
            return
        if weight_decay != 0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(params, updates, alpha=-lr_ratio * lr)

    def _step_count(self, p: Tensor, st: dict) -> int:
        """The steps ``p`` has taken, from a host-side mirror of ``st["step"]``: reading the tensor
        itself would be a host sync per parameter and step on an accelerator. The mirror is
        trusted while ``st["step"]`` is the tensor it was taken from, unmodified since (its
        version counter): a loaded state brings new tensors or writes into these in place
        (``torch.distributed.checkpoint`` does), and either is read once."""
        mirror = self.__dict__.setdefault("_steps", {})
        step = st["step"]
        entry = mirror.get(p)
        version = _version(step)
        if entry is not None and entry[0] is step and version >= 0 and entry[1] == version:
            return entry[2]
        count = int(step.item())
        mirror[p] = (step, _version(step), count)
        return count

    def _count_step(self, p: Tensor, st: dict, count: int) -> None:
        """Record ``count`` as ``p``'s steps, right after ``st["step"]`` was set to it."""
        step = st["step"]
        self.__dict__.setdefault("_steps", {})[p] = (step, _version(step), count)

    @staticmethod
    def _init_cosmos_state(p: Tensor, st: dict, view: MatrixView, group: dict) -> None:
        r = view.rank(group["rank"])
        shapes = view.state_shapes(r)
        dtypes = {key: _storage_dtype(group, p, key) for key in ("M", "U", "S", "V")}
        st["step"] = torch.zeros((), dtype=torch.float32)
        # M and V follow the parameter's layout (sharded by rows, or by experts, under FSDP2);
        # U and S are small and replicated, except for expert stacks, whose bases are per expert.
        st["M"] = torch.zeros_like(p, dtype=dtypes["M"], memory_format=torch.contiguous_format)
        for key in ("U", "S", "V"):
            sharded = is_dtensor(p) and (key == "V" or view.layout == "stack")
            st[key] = _zeros_sharded_like(p, shapes[key], dtypes[key]) if sharded else torch.zeros(
                shapes[key], dtype=dtypes[key], device=p.device)

    def _cosmos_bucket(
        self, group: dict, slots: list["_Slots"], m: int, m_local: int, n: int, r: int, step: int,
        request: Optional[int], comm: Comm,
    ) -> list[Tensor]:
        """One COSMOS step on the matrices of ``slots`` (all ``m x n``, rank ``r``, the same step);
        returns each slot's direction, ``(count, rows, n)``."""
        beta1, beta2 = group["betas"]
        t = step + 1
        interval = group["update_interval"]
        init = step == 0
        refresh = not init and (request is not None or (interval > 0 and t % interval == 0))
        power_iters = request or group["power_iters"]
        cdt = _compute_dtype(slots[0].p)

        # The state of each slot as (count, rows, n) / (count, n, r) / (count, r, r) / (count, rows, r)
        # views, and the gradient (read-only: .to() may alias p.grad, which must never change).
        views = [_slot_views(self.state[s.p], s, r, cdt) for s in slots]
        if sum(v["G"].shape[0] for v in views) == 0:
            return [v["G"] for v in views]  # no local matrix (experts sharded to other ranks)
        # Work in place on the state when one slot holds it in the compute dtype; otherwise on
        # stacked / upcast copies that are written back (bf16 moments by stochastic rounding).
        copied = {k for k in ("M", "U", "S", "V") if len(views) > 1 or views[0][k].dtype != cdt}
        work = {k: torch.cat([v[k].to(cdt) for v in views]) if k in copied else views[0][k]
                for k in ("M", "U", "S", "V")}
        work["G"] = views[0]["G"] if len(views) == 1 else torch.cat([v["G"] for v in views])
        if work["G"].shape[0] == 1:  # one matrix: 2-D maths
            work = {k: x[0] for k, x in work.items()}
        D = self._direction(
            work["G"], work["M"], work["U"], work["S"], work["V"], t=t, m=m, n=n, init=init,
            refresh=refresh, power_iters=power_iters, beta1=beta1, beta2=beta2, eps=group["eps"],
            gamma=group["gamma"], nesterov=group["nesterov"], ns_steps=group["ns_steps"],
            ns_dtype=resolve_ns_dtype(group["ns_dtype"], cdt), comm=comm,
            products=_PRODUCTS[group.get("subspace_dtype", "float32")],
        )
        if D.ndim == 2:
            D = D.unsqueeze(0)
        counts = [v["G"].shape[0] for v in views]
        for key in copied:
            pieces = work[key].reshape(-1, *views[0][key].shape[1:]).split(counts)
            for slot, v, piece in zip(slots, views, pieces):
                if v[key].dtype == piece.dtype:
                    v[key].copy_(piece)
                else:
                    F.stochastic_round_(v[key], piece, self._rounding_generator(slot.p, t, slot.first))
        return list(D.split(counts))


_LOCAL = LocalComm()


def _version(t: Tensor) -> int:
    """``t``'s in-place modification counter (-1 where there is none: then the mirror is never
    trusted and the count is read)."""
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _compiled_direction() -> Callable[..., Tensor]:
    """:func:`cosmos_direction` under ``torch.compile``: the whole per-bucket update (state
    updates, subspace products, Newton-Schulz, combination) as fused kernels, one graph per
    bucket shape and step kind (first, refresh, plain); the step number becomes a symbolic
    input after its first change, so the graphs are not rebuilt every step."""
    return torch.compile(cosmos_direction, dynamic=None)
_PRODUCTS = {name: F.Products(name) for name in F.SUBSPACE_DTYPES}


class _Slots:
    """Consecutive equal parts ``first .. first + count - 1`` of every matrix of parameter ``p``."""

    __slots__ = ("p", "view", "first", "count")

    def __init__(self, p: Tensor, view: MatrixView, first: int, count: int) -> None:
        self.p, self.view, self.first, self.count = p, view, first, count


class _Pending:
    """A parameter whose parts are being computed: its directions by first part index."""

    __slots__ = ("p", "view", "runs", "parts")

    def __init__(self, p: Tensor, view: MatrixView, runs: int) -> None:
        self.p, self.view, self.runs = p, view, runs
        self.parts: dict[int, Tensor] = {}


def _part_runs(parts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive equal parts: ``(first index, count, rows)``. A run is one
    contiguous block of rows, so its matrices are views of the parameter-shaped tensors."""
    runs: list[tuple[int, int, int]] = []
    for i, rows in enumerate(parts):
        if runs and runs[-1][2] == rows:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, rows)
        else:
            runs.append((i, 1, rows))
    return runs


def _slot_views(st: dict, slot: _Slots, r: int, cdt: torch.dtype) -> dict[str, Tensor]:
    """Views of a slot's gradient and state: ``G``, ``M`` ``(b, rows, n)``, ``U`` ``(b, n, r)``,
    ``S`` ``(b, r, r)``, ``V`` ``(b, rows, r)`` with ``b = batch * count`` (``batch``: the local
    experts of a stack, else 1). In-place updates of ``M``, ``U``, ``S``, ``V`` reach the state."""
    view, p = slot.view, slot.p
    k, n = len(view.parts), view.n
    rows = view.parts[slot.first]
    start = view.offsets[slot.first]
    stop = start + rows * slot.count
    local_p = local_tensor(p)
    batch = local_p.shape[0] if view.layout == "stack" else 1

    def rows_of(t: Tensor, cols: int) -> Tensor:  # (batch, m, cols) -> (batch * count, rows, cols)
        if k == 1:  # whole matrices (also this rank's rows of a row-sharded one)
            return t
        return t[:, start:stop].reshape(batch * slot.count, rows, cols)

    def per_part(t: Tensor, tail: tuple[int, ...]) -> Tensor:  # -> this slot's parts, (batch * count, *tail)
        return t.reshape(batch, k, *tail)[:, slot.first:slot.first + slot.count].reshape(batch * slot.count, *tail)

    return {
        "G": rows_of(view.matrices(local_tensor(p.grad)), n).to(cdt),
        "M": rows_of(view.matrices(local_tensor(st["M"])), n),
        "U": per_part(local_tensor(st["U"]), (n, r)),
        "S": per_part(local_tensor(st["S"]), (r, r)),
        "V": rows_of(local_tensor(st["V"]).reshape(batch, local_tensor(st["V"]).shape[-2], r), r),
    }


def resolve_ns_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The Newton-Schulz dtype of a group's ``ns_dtype``: ``"float32"`` means full precision,
    i.e. the compute dtype (float64 for float64 parameters)."""
    return compute_dtype if name == "float32" else NS_DTYPES[name]


# ---------------------------------------------------------------------- validation
def _validate(group: dict, where: str) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"invalid {key}={group[key]!r} in {where}: {why}")

    alg = group.get("algorithm")
    if alg not in ALGORITHMS:
        raise ValueError(f"invalid algorithm={alg!r} in {where}: must be one of {ALGORITHMS}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        raise ValueError(f"invalid lr={lr!r} in {where}: pass a float, not a Tensor")
    for key in ("lr", "weight_decay", "eps", "lr_ratio", "gamma"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(key, "must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise bad("betas", "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"invalid beta{i + 1}={b!r} (betas={tuple(betas)!r}) in {where}: must be in [0, 1)")
    for key, low in (("rank", 0), ("ns_steps", 0), ("update_interval", 0), ("power_iters", 1)):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise bad(key, f"must be an int >= {low}")
    if group["ns_dtype"] not in NS_DTYPES:
        raise bad("ns_dtype", f"must be one of {tuple(NS_DTYPES)}")
    if group.get("state_dtype", "float32") not in STATE_DTYPES:
        raise bad("state_dtype", f"must be one of {tuple(STATE_DTYPES)}")
    if group.get("subspace_dtype", "float32") not in F.SUBSPACE_DTYPES:
        raise bad("subspace_dtype", f"must be one of {F.SUBSPACE_DTYPES}")
    if not isinstance(group["nesterov"], bool):
        raise bad("nesterov", "must be a bool")


def _zeros_sharded_like(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero DTensor of global ``shape`` sharded on dim 0 like ``p`` (``shape[0] == p.shape[0]``:
    the rows of a matrix, or the experts of a stack)."""
    from torch.distributed.tensor import DTensor

    local = torch.zeros(p.to_local().shape[0], *shape[1:], dtype=dtype, device=p.to_local().device)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)
