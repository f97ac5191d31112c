r"""The training harness of the benchmarks that train (:mod:`zoo.bench.convergence`,
:mod:`zoo.bench.refresh`, :mod:`zoo.bench.gpu`): one setup, the corpus, runs that train in
lockstep, the optimizers they compare, and the helpers that summarise runs.

- :class:`Setup`: what every run shares (model config, batch shape, steps, evaluation points,
  warm-up + cosine schedule, device); :func:`make_setup` builds it from the command line of
  :func:`add_training_args`.
- :class:`Data`: the byte-tokenised corpus of :class:`zoo.data.TextDataModule`, one batch stream
  per seed (a seed fixes the shuffle order), the validation batches held in memory.
- :class:`Run`: one model, its optimizer and :class:`lit_cosmos.WarmupCosine` schedule, and what
  was measured (train and validation losses, ``optimizer.step()`` seconds, whole-step seconds).
- :func:`train_lockstep`: step ``t`` of every run, in an order that rotates every step (reversed
  on odd steps), then step ``t + 1``. Each run's ``optimizer.step()`` is timed alone (forward and
  backward apart), so step-time ratios compare runs that met the same machine state; ratios are
  taken per block of steps, median over blocks (:func:`block_ratio`).
- :func:`build_optimizer`: the candidates, all over the routed groups of
  :func:`lit_cosmos.cosmos_param_groups` (hidden matrices, embeddings + head, norms without weight
  decay), weight decay :data:`WEIGHT_DECAY` elsewhere:

==========  ===========================================================================
AdamW       ``torch.optim.AdamW`` on every group, betas (0.9, 0.95).
Muon        :class:`lit_cosmos.MuonAdamW`: torch Muon on the matrices (``match_rms_adamw``,
            momentum 0.95, Nesterov), AdamW (0.9, 0.95) on the rest, one ``lr`` for both.
COSMOS      :class:`lit_cosmos.COSMOS` (its defaults unless told otherwise); AdamW on the rest.
SOAP        ``pytorch_optimizer.SOAP`` on every parameter, betas (0.95, 0.95),
            preconditioner refresh every :data:`SOAP_FREQUENCY` steps.
==========  ===========================================================================

A run whose loss or gradient becomes non-finite is stopped and marked diverged.

Example::

    setup = Setup(model="debug", overrides={"n_layer": 1}, block_size=16, batch_size=2, steps=4,
                  eval_every=2, warmup_steps=1, min_lr_ratio=0.1)
    data = Data(setup, cache_dir="data")
    run = Run.create("cosmos", "cosmos", 1e-2, 0, setup, data.vocab_size,
                     partial(build_optimizer, "cosmos", lr=1e-2, rank=4))
    train_lockstep([run], setup, data)
    run.val_loss      # [loss at step 0, at step 2, at step 4]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from lit_cosmos import COSMOS, MuonAdamW, WarmupCosine, cosmos_param_groups
from zoo.bench import common
from zoo.config import Config
from zoo.data import TextDataModule
from zoo.model import GPT

__all__ = [
    "LABELS", "OPTIMIZERS", "SOAP_FREQUENCY", "WEIGHT_DECAY", "Data", "Run", "Setup", "add_training_args",
    "block_ratio", "build_optimizer", "curve_band", "fmt_loss", "make_setup", "mean_std", "settings_dict",
    "setup_markdown", "train_lockstep",
]

OPTIMIZERS = ("adamw", "muon", "cosmos", "soap")
LABELS = {"adamw": "AdamW", "muon": "Muon", "cosmos": "COSMOS", "soap": "SOAP"}
SOAP_FREQUENCY = 10
WEIGHT_DECAY = 0.1


# ---------------------------------------------------------------------- optimizers
def build_optimizer(name: str, params: Any, lr: float, weight_decay: float = WEIGHT_DECAY,
                    **cosmos_kwargs: Any) -> torch.optim.Optimizer:
    """Candidate ``name`` over routed param groups ``params`` (see the module docstring).

    ``cosmos_kwargs`` go to :class:`~lit_cosmos.COSMOS` only (e.g. ``rank``, ``update_interval``).
    The routed ``adamw_no_decay`` group keeps its own ``weight_decay=0`` in every candidate.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name == "muon":
        return MuonAdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "cosmos":
        return COSMOS(params, lr=lr, weight_decay=weight_decay, **cosmos_kwargs)
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(params, lr=lr, betas=(0.95, 0.95), weight_decay=weight_decay, precondition_frequency=SOAP_FREQUENCY)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# ---------------------------------------------------------------------- training
@dataclass
class Setup:
    """What every run of a benchmark shares: model, data shapes, budget, schedule."""

    model: str
    overrides: dict[str, Any]
    block_size: int
    batch_size: int
    steps: int
    eval_every: int
    warmup_steps: int
    min_lr_ratio: float
    device: str = "cpu"
    val_batches: Optional[int] = None  # None: the whole validation split

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def config(self, vocab_size: int) -> Config:
        sizes = {"block_size": self.block_size, "vocab_size": vocab_size}
        return Config.from_name(self.model, **{**self.overrides, **sizes})

    def eval_steps(self) -> list[int]:
        return sorted({0, self.steps, *range(self.eval_every, self.steps, self.eval_every)})


class Data:
    """The prepared corpus: one training-batch stream per seed (its own shuffle order, epochs
    chained), the validation batches held in memory."""

    def __init__(self, setup: Setup, cache_dir: str, paths: Optional[Sequence[str]] = None) -> None:
        self.setup = setup
        self.kwargs = dict(paths=list(paths) if paths else None, block_size=setup.block_size,
                           batch_size=setup.batch_size, cache_dir=cache_dir)
        dm = TextDataModule(**self.kwargs)
        dm.prepare_data()
        dm.setup("fit")
        self.vocab_size = dm.vocab_size
        self.num_tokens = dict(dm.num_tokens)
        val = list(dm.val_dataloader())
        self.val = val if setup.val_batches is None else val[: setup.val_batches]
        self._streams: dict[int, Iterator[torch.Tensor]] = {}

    def _stream(self, seed: int) -> Iterator[torch.Tensor]:
        dm = TextDataModule(**self.kwargs, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        while True:
            empty = True
            for batch in loader:  # a new pass is a new epoch (litdata reshuffles)
                empty = False
                yield batch
            if empty:
                raise RuntimeError("the training split yields no batch")

    def next_batch(self, seed: int) -> torch.Tensor:
        if seed not in self._streams:
            self._streams[seed] = self._stream(seed)
        return next(self._streams[seed])


@dataclass
class Run:
    """One training run: a model, its optimizer and LR schedule, and what was measured."""

    key: str  # e.g. "cosmos/lr=0.004/seed=0"
    optimizer_name: str
    lr: float
    seed: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: str
    step: int = 0
    diverged: Optional[str] = None  # why, when the run was stopped
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)  # optimizer.step() seconds, per step
    train_s: list[float] = field(default_factory=list)  # forward + backward + step seconds, per step
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, key: str, optimizer_name: str, lr: float, seed: int, setup: Setup, vocab_size: int,
               make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> "Run":
        torch.manual_seed(seed)
        model = GPT(setup.config(vocab_size)).to(setup.device)
        optimizer = make_optimizer(cosmos_param_groups(model))
        schedule = WarmupCosine(setup.warmup_steps, setup.steps, setup.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return cls(key, optimizer_name, lr, seed, model, optimizer, scheduler, setup.device)

    def train_step(self, batch: torch.Tensor) -> None:
        if self.diverged:
            return
        sync = common.device_sync(self.device)
        batch = batch.to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        self.model.train()
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        if sync is not None:
            sync()
        t1 = time.perf_counter()
        try:
            self.optimizer.step()
        except FloatingPointError as err:  # COSMOS refuses a non-finite gradient
            self.diverged = f"step {self.step + 1}: {err}"
        if sync is not None:
            sync()
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.train_loss.append(value)
        self.opt_s.append(t2 - t1)
        self.train_s.append(t2 - t0)
        if not math.isfinite(value) and not self.diverged:
            self.diverged = f"step {self.step}: training loss {value}"

    @torch.no_grad()
    def evaluate(self, val: Sequence[torch.Tensor]) -> float:
        """Token-weighted mean cross entropy over ``val`` (NaN once the run has diverged)."""
        value = float("nan")
        if not self.diverged:
            self.model.eval()
            total, count = 0.0, 0
            for batch in val:
                batch = batch.to(self.device)
                logits = self.model(batch[:, :-1])
                total += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
                count += batch[:, 1:].numel()
            value = total / count
            if not math.isfinite(value):
                self.diverged = f"step {self.step}: validation loss {value}"
        self.eval_steps.append(self.step)
        self.val_loss.append(value)
        return value

    @property
    def final_val(self) -> float:
        return self.val_loss[-1] if self.val_loss and not self.diverged else float("nan")

    @property
    def best_val(self) -> float:
        finite = [v for v in self.val_loss if math.isfinite(v)]
        return min(finite) if finite and not self.diverged else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key, "optimizer": self.optimizer_name, "lr": self.lr, "seed": self.seed,
            "diverged": self.diverged, "final_val_loss": self.final_val, "best_val_loss": self.best_val,
            "curve": {"step": self.eval_steps, "val_loss": self.val_loss},
            "train_loss": self.train_loss,
            "first_opt_step_s": self.opt_s[0] if self.opt_s else None,
            **self.extra,
        }

    def release(self) -> None:
        """Drop the model and optimizer (keep the measurements)."""
        self.model = self.optimizer = self.scheduler = None  # type: ignore[assignment]


def train_lockstep(runs: Sequence[Run], setup: Setup, data: Data, desc: str = "", show_progress: bool = True,
                   before_step: Optional[Callable[[Run], None]] = None,
                   after_step: Optional[Callable[[Run], None]] = None) -> float:
    """Train ``runs`` for ``setup.steps`` steps each, in lockstep, the order rotating every step
    (reversed on odd steps, as :class:`zoo.bench.common.InterleavedTimer`). Evaluates every run
    on the steps of ``setup.eval_steps()``. ``before_step`` / ``after_step`` are called around
    each run's step, outside its timed region. Returns the wall-clock seconds."""
    t_start = time.perf_counter()
    evals = set(setup.eval_steps())
    runs = list(runs)
    n = len(runs)
    for run in runs:
        run.evaluate(data.val)
    for t in common.progress(range(1, setup.steps + 1), setup.steps, desc, show_progress):
        batches = {seed: data.next_batch(seed) for seed in sorted({r.seed for r in runs})}
        order = runs[t % n:] + runs[: t % n]
        for run in order if t % 2 == 0 else order[::-1]:
            if before_step is not None:
                before_step(run)
            run.train_step(batches[run.seed])
            if after_step is not None:
                after_step(run)
        if t in evals:
            for run in runs:
                run.evaluate(data.val)
    return time.perf_counter() - t_start


def block_ratio(runs: Sequence[Run], base: Sequence[Run], block: int, attr: str = "opt_s") -> float:
    """Median over blocks of ``block`` steps (the first, with the state-building step 1, left
    out) of mean seconds per step of ``runs`` over that of ``base``, both from the same phase."""
    def per_block(rs: Sequence[Run]) -> list[float]:
        rs = [r for r in rs if not r.diverged]
        if not rs:
            return []
        steps = min(len(getattr(r, attr)) for r in rs)
        return [statistics.fmean(s for r in rs for s in getattr(r, attr)[b: b + block])
                for b in range(block, steps - block + 1, block)]

    return common.ratio_median(per_block(runs), per_block(base))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (both NaN when any value is NaN: a diverged seed counts;
    the deviation NaN for a single value)."""
    if not xs or any(not math.isfinite(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def fmt_loss(mean: float, std: Optional[float] = None) -> str:
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.4f}" if std is None or not math.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def curve_band(runs: Sequence[Run]) -> dict[str, list[float]]:
    """Mean, min and max over ``runs`` of the validation curve, step by step."""
    steps = runs[0].eval_steps
    cols = list(zip(*(r.val_loss for r in runs)))
    return {"step": steps, "mean": [statistics.fmean(c) for c in cols], "min": [min(c) for c in cols],
            "max": [max(c) for c in cols]}


# ---------------------------------------------------------------------- command line of the training benchmarks
def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-tiny", help="zoo config name (vocab_size is always the tokenizer's)")
    p.add_argument("--n-layer", type=int, default=None,
                   help="override the config's n_layer (default 4; 1 with --quick)")
    p.add_argument("--n-embd", type=int, default=None, help="override n_embd (default: the config's; 32 with --quick)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default 128; 32 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; 4 with --quick)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens per run (default 655360 = 320 steps of 16 x 128; 20 steps with --quick)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: steps / 16)")
    p.add_argument("--val-batches", type=int, default=None, help="validation batches (default all; 4 with --quick)")
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warm-up, fraction of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, fraction of the peak lr")
    p.add_argument("--data", nargs="+", default=None, help="text files/folders (default: the stdlib docs corpus)")
    p.add_argument("--data-cache", default="data", help="where the tokenized corpus is prepared (default ./data)")
    p.add_argument("--block", type=int, default=None, help="steps per timing block (ratios are medians over blocks)")


def make_setup(args: argparse.Namespace, block_default: int) -> Setup:
    """Resolve the training defaults (full or ``--quick``) and validate them."""
    q = args.quick
    args.n_layer = args.n_layer if args.n_layer is not None else (1 if q else 4)
    overrides: dict[str, Any] = {"n_layer": args.n_layer}
    if args.n_embd is not None or q:
        args.n_embd = args.n_embd if args.n_embd is not None else 32
        overrides.update(n_embd=args.n_embd, intermediate_size=int(args.n_embd * 11 / 4) // 8 * 8 or 8)
    args.block_size = args.block_size or (32 if q else 128)
    args.batch_size = args.batch_size or (4 if q else 16)
    tokens = args.tokens if args.tokens is not None else (20 * args.block_size * args.batch_size if q else 655_360)
    steps = int(tokens) // (args.block_size * args.batch_size)
    if steps < 2:
        raise SystemExit(f"--tokens {tokens:g} is fewer than 2 steps of {args.batch_size} x {args.block_size} tokens")
    args.eval_every = args.eval_every or max(1, steps // (4 if q else 16))
    args.val_batches = args.val_batches if args.val_batches is not None else (4 if q else None)
    args.block = args.block or block_default
    if args.eval_every < 1 or (args.val_batches is not None and args.val_batches < 1) or args.block < 1:
        raise SystemExit("--eval-every, --val-batches and --block must be >= 1")
    if not 0 <= args.warmup_fraction < 1 or not 0 <= args.min_lr_ratio <= 1:
        raise SystemExit("--warmup-fraction must be in [0, 1) and --min-lr-ratio in [0, 1]")
    if args.model not in Config.available():
        raise SystemExit(f"unknown model {args.model!r}; available: {', '.join(Config.available())}")
    setup = Setup(model=args.model, overrides=overrides, block_size=args.block_size, batch_size=args.batch_size,
                  steps=steps, eval_every=args.eval_every, warmup_steps=int(round(args.warmup_fraction * steps)),
                  min_lr_ratio=args.min_lr_ratio, device=args.device, val_batches=args.val_batches)
    try:
        setup.config(257)
    except ValueError as err:
        raise SystemExit(f"invalid model settings: {err}") from None
    return setup


def settings_dict(args: argparse.Namespace, setup: Setup, data: Data) -> dict[str, Any]:
    config = setup.config(data.vocab_size)
    return {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": setup.steps, "tokens_per_step": setup.tokens_per_step, "tokens": setup.steps * setup.tokens_per_step,
        "warmup_steps": setup.warmup_steps, "eval_steps": setup.eval_steps(),
        "model_config": config.to_dict(), "parameters": config.num_parameters(),
        "corpus_tokens": data.num_tokens, "val_tokens_used": sum(b[:, 1:].numel() for b in data.val),
        "epochs": setup.steps * setup.tokens_per_step / max(1, data.num_tokens.get("train", 1)),
    }


def setup_markdown(s: dict[str, Any]) -> str:
    c = s["model_config"]
    return (f"Setup: `{s['model']}` with {c['n_layer']} blocks, d={c['n_embd']}, {c['n_head']} heads, "
            f"MLP {c['intermediate_size']}, byte tokens (vocab {c['vocab_size']}), {s['parameters'] / 1e6:.2f}M "
            f"parameters; batch {s['batch_size']} x {s['block_size']} tokens, {s['steps']} steps = {s['tokens']:,} "
            f"tokens ({s['epochs']:.2f} epochs of {s['corpus_tokens'].get('train', 0):,} train tokens); warm-up "
            f"{s['warmup_steps']} steps then cosine to {s['min_lr_ratio']} x lr; validation on "
            f"{s['val_tokens_used']:,} held-out tokens every {s['eval_every']} steps.")

