r"""Validation loss of COSMOS, AdamW, Muon and SOAP after the same token budget, each at its best
learning rate.

Setup: a small byte-level LLaMA from the zoo (by default ``llama-tiny`` cut to 4 blocks with
128-token sequences: 0.87M parameters, 4 x 7 weight matrices of 128 x 128 / 352 x 128) trained on
the text of :class:`zoo.data.TextDataModule` (by default the Python documentation shipped with the
standard library, 440K train / 23K validation byte tokens) for a fixed number of tokens, with the
same linear-warmup + cosine schedule (:class:`lit_cosmos.WarmupCosine`, the one
:class:`zoo.lit_model.CausalLM` uses) for every optimizer.

Every candidate gets the same routing, :func:`lit_cosmos.cosmos_param_groups`: the hidden weight
matrices in one group, embeddings and output head in a second, norms in a third without weight
decay; weight decay is 0.1 everywhere else. One learning rate per candidate is tuned:

==========  ===========================================================================
AdamW       ``torch.optim.AdamW`` on every group, betas (0.9, 0.95).
Muon        :class:`lit_cosmos.MuonAdamW`: torch Muon on the matrices (``match_rms_adamw``,
            momentum 0.95, Nesterov), AdamW (0.9, 0.95) on the rest, one ``lr`` for both.
COSMOS      :class:`lit_cosmos.COSMOS` with its defaults (rank 64, lr_ratio 0.2, gamma 0.2,
            betas (0.95, 0.95), eigenbasis refresh every step); AdamW on the rest.
SOAP        ``pytorch_optimizer.SOAP`` on EVERY parameter (its normal use: embeddings and
            head are preconditioned on both sides, they are only 257 x d; norms get its
            Adam), betas (0.95, 0.95), preconditioner refresh every 10 steps. SOAP skips
            its first step (it only builds the preconditioner there).
==========  ===========================================================================

Protocol: (1) the learning-rate sweep: every grid value of every candidate, seed ``--seed``;
the value with the lowest final validation loss is chosen (a value at the edge of its grid is
flagged: the optimum may lie outside it). (2) ``--seeds`` seeds at the chosen rate (the sweep's
run is reused as the first seed: training is deterministic). A seed fixes the initial weights and
the order of the training batches; every candidate sees the same batches for the same seed.

The runs of one phase train in lockstep in one process: step t of every run, in an order that
rotates every step, then step t + 1. Each run's ``optimizer.step()`` is timed alone (fwd/bwd
apart), so step-time ratios are taken between runs that met the same machine state; ratios to
AdamW are per block of ``--block`` steps (a multiple of SOAP's refresh period), median over
blocks (see :mod:`zoo.bench.common`). The validation loss is the token-weighted mean over the
whole validation split, measured before training and every ``--eval-every`` steps.

A run whose loss or gradient becomes non-finite is stopped and marked diverged; it cannot be
chosen by the sweep.

Example::

    python -m zoo.bench convergence --out /tmp/bench_results/convergence        # ~25 min on 1 CPU thread
    python -m zoo.bench convergence --quick --out /tmp/conv                      # seconds
    python -m zoo.bench convergence --device cuda --model llama-60m --block-size 512 \
        --batch-size 32 --tokens 200_000_000 --data /path/to/texts              # GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from lit_cosmos import COSMOS, MuonAdamW, cosmos_param_groups
from lit_cosmos import WarmupCosine
from zoo.bench import common
from zoo.config import Config
from zoo.data import TextDataModule
from zoo.model import GPT

NAME = "convergence"
OPTIMIZERS = ("adamw", "muon", "cosmos", "soap")
LABELS = {"adamw": "AdamW", "muon": "Muon", "cosmos": "COSMOS", "soap": "SOAP"}
SOAP_FREQUENCY = 10
WEIGHT_DECAY = 0.1
#: Default learning-rate grids (factor 2 apart), centred on the best value of a 5-point pilot sweep
#: on the default setup, seed 0 (final validation loss; 2 CPU cores, 24 min):
#:   AdamW  1e-3 1.745, 2e-3 1.662, 4e-3 1.630*, 8e-3 1.890, 1.6e-2 2.185
#:   Muon   2e-3 1.680, 4e-3 1.394, 8e-3 1.308, 1.6e-2 1.304*, 3.2e-2 1.444
#:   COSMOS 2e-3 1.401, 4e-3 1.267, 8e-3 1.253*, 1.6e-2 1.321, 3.2e-2 1.441
#:   SOAP   1e-3 2.587, 2e-3 1.815, 4e-3 1.484, 8e-3 1.450*, 1.6e-2 1.592
#: made by ``python -m zoo.bench convergence --seeds 1 --lr-grid adamw=1e-3,2e-3,4e-3,8e-3,1.6e-2
#: --lr-grid muon=2e-3,4e-3,8e-3,1.6e-2,3.2e-2 --lr-grid cosmos=2e-3,...,3.2e-2 --lr-grid soap=1e-3,...,1.6e-2``.
DEFAULT_GRIDS = {
    "adamw": (2e-3, 4e-3, 8e-3),
    "muon": (8e-3, 1.6e-2, 3.2e-2),
    "cosmos": (4e-3, 8e-3, 1.6e-2),
    "soap": (4e-3, 8e-3, 1.6e-2),
}
QUICK_GRIDS = {"adamw": (3e-3, 1e-2), "muon": (1e-2, 3e-2), "cosmos": (1e-2, 3e-2), "soap": (3e-3, 1e-2)}


# ---------------------------------------------------------------------- optimizers
def build_optimizer(name: str, params: Any, lr: float, weight_decay: float = WEIGHT_DECAY, **cosmos_kwargs: Any) -> torch.optim.Optimizer:
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
        return Config.from_name(self.model, **{**self.overrides, "block_size": self.block_size, "vocab_size": vocab_size})

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
                   before_step: Optional[Callable[[Run], None]] = None, after_step: Optional[Callable[[Run], None]] = None) -> float:
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


# ---------------------------------------------------------------------- CLI plumbing shared with refresh
def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-tiny", help="zoo config name (vocab_size is always the tokenizer's)")
    p.add_argument("--n-layer", type=int, default=None, help="override the config's n_layer (default 4; 1 with --quick)")
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
    return (f"Setup: `{s['model']}` with {c['n_layer']} blocks, d={c['n_embd']}, {c['n_head']} heads, MLP {c['intermediate_size']}, "
            f"byte tokens (vocab {c['vocab_size']}), {s['parameters'] / 1e6:.2f}M parameters; batch {s['batch_size']} x "
            f"{s['block_size']} tokens, {s['steps']} steps = {s['tokens']:,} tokens ({s['epochs']:.2f} epochs of "
            f"{s['corpus_tokens'].get('train', 0):,} train tokens); warm-up {s['warmup_steps']} steps then cosine to "
            f"{s['min_lr_ratio']} x lr; validation on {s['val_tokens_used']:,} held-out tokens every {s['eval_every']} steps.")


# ---------------------------------------------------------------------- the benchmark
def _parse_grids(items: Optional[list[str]], defaults: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    grids = dict(defaults)
    for item in items or []:
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS or not values:
            raise SystemExit(f"--lr-grid takes OPTIMIZER=LR[,LR...] with OPTIMIZER in {OPTIMIZERS}, got {item!r}")
        try:
            lrs = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--lr-grid {item!r}: learning rates must be numbers") from None
        if any(not (math.isfinite(v) and v > 0) for v in lrs):
            raise SystemExit(f"--lr-grid {item!r}: learning rates must be > 0")
        grids[name] = lrs
    return grids


def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    add_training_args(p)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--lr-grid", action="append", metavar="OPT=LR,LR,...",
                   help="learning rates swept for OPT (repeatable); one value skips that sweep. Defaults: "
                        + "; ".join(f"{k} {','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_GRIDS.items()))
    p.add_argument("--seeds", type=int, default=None, help="seeds at the chosen lr (default 3; 2 with --quick)")
    p.add_argument("--rank", type=int, default=64, help="COSMOS rank")
    p.set_defaults(threads=1)
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict."""
    return common.run_benchmark(build_parser, NAME, _run, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    t_start = time.perf_counter()
    setup = make_setup(args, block_default=SOAP_FREQUENCY)
    grids = _parse_grids(args.lr_grid, QUICK_GRIDS if args.quick else DEFAULT_GRIDS)
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if args.seeds < 1 or args.rank < 0:
        raise SystemExit("--seeds must be >= 1 and --rank >= 0")
    optimizers = [o for o in OPTIMIZERS if o in args.optimizers]
    notes: list[str] = []
    if "soap" in optimizers:
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            optimizers.remove("soap")
            notes.append("SOAP skipped: pytorch-optimizer is not installed (pip install 'lit-cosmos[bench]').")
    machine = common.machine_info(args.device, [NAME, *argv])
    common.warm_kernels()
    data = Data(setup, args.data_cache, args.data)
    show = not args.no_progress

    def make(opt: str, lr: float, seed: int) -> Run:
        factory = partial(build_optimizer, opt, lr=lr, rank=args.rank) if opt == "cosmos" else partial(build_optimizer, opt, lr=lr)
        return Run.create(f"{opt}/lr={lr:g}/seed={seed}", opt, lr, seed, setup, data.vocab_size, factory)

    # Phase 1: the learning-rate sweep on one seed.
    sweep = [make(o, lr, args.seed) for o in optimizers for lr in grids[o]]
    wall = {"sweep_s": train_lockstep(sweep, setup, data, "lr sweep", show)}
    chosen: dict[str, float] = {}
    for o in optimizers:
        runs = [r for r in sweep if r.optimizer_name == o]
        ok = [r for r in runs if not r.diverged]
        if not ok:
            notes.append(f"{LABELS[o]}: every learning rate of the sweep diverged; no final runs.")
            continue
        best = min(ok, key=lambda r: r.final_val)
        chosen[o] = best.lr
        grid = sorted(grids[o])
        if len(grid) > 1 and best.lr in (grid[0], grid[-1]):
            notes.append(f"{LABELS[o]}: the best learning rate {best.lr:g} is at the "
                         f"{'low' if best.lr == grid[0] else 'high'} edge of its grid; the optimum may lie outside it.")
    for r in sweep:
        if r.diverged:
            notes.append(f"sweep run {r.key} diverged ({r.diverged}).")

    # Phase 2: the other seeds at the chosen rates (the sweep's run is the first seed).
    for r in sweep:
        if chosen.get(r.optimizer_name) != r.lr:
            r.release()
    extra_seeds = list(range(args.seed + 1, args.seed + args.seeds))
    finals = [make(o, chosen[o], s) for o in optimizers if o in chosen for s in extra_seeds]
    wall["seeds_s"] = train_lockstep(finals, setup, data, "seeds", show) if finals else 0.0

    by_opt: dict[str, list[Run]] = {o: [r for r in sweep if r.optimizer_name == o and r.lr == chosen[o]]
                                    + [r for r in finals if r.optimizer_name == o] for o in chosen}
    rows = []
    for o, runs in by_opt.items():
        fin_m, fin_s = mean_std([r.final_val for r in runs])
        best_m, best_s = mean_std([r.best_val for r in runs])
        ok = [r for r in runs if not r.diverged]
        tail = [statistics.fmean(r.train_loss[-setup.eval_every:]) for r in ok]
        row = {
            "optimizer": o, "label": LABELS[o], "lr": chosen[o], "seeds": [r.seed for r in runs],
            "final_val_loss": [r.final_val for r in runs], "final_mean": fin_m, "final_std": fin_s,
            "best_val_loss": [r.best_val for r in runs], "best_mean": best_m, "best_std": best_s,
            "final_train_loss_mean": statistics.fmean(tail) if tail else float("nan"),
            "diverged": [r.key for r in runs if r.diverged],
            "curve_band": curve_band(ok) if ok else None,
        }
        if "cosmos" in by_opt:
            # Same seed = same initial weights and batches: the paired difference is much less
            # noisy than the difference of the means.
            paired = [a.final_val - b.final_val for a, b in zip(runs, by_opt["cosmos"])]
            row["delta_vs_cosmos_mean"], row["delta_vs_cosmos_std"] = mean_std(paired)
        if "adamw" in by_opt:
            row["opt_step_vs_adamw"] = _phase_ratio(o, "adamw", sweep, finals, chosen, args.block, "opt_s")
            row["train_step_vs_adamw"] = _phase_ratio(o, "adamw", sweep, finals, chosen, args.block, "train_s")
        rows.append(row)
    wall["total_s"] = time.perf_counter() - t_start
    result = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {**settings_dict(args, setup, data), "grids": {o: list(grids[o]) for o in optimizers},
                     "optimizers": optimizers},
        "notes": notes,
        "wall_clock": wall,
        "sweep": [{k: v for k, v in r.summary().items() if k != "train_loss"} for r in sweep],
        "chosen_lr": chosen,
        "rows": rows,
        "runs": [r.summary() for rs in by_opt.values() for r in rs],
    }
    md = to_markdown(result)
    return common.publish(args.out, result, md, plot(result))


def _phase_ratio(opt: str, base: str, sweep: list[Run], finals: list[Run], chosen: dict[str, float], block: int, attr: str) -> float:
    """Step-time ratio of ``opt`` to ``base`` at their chosen rates, median over the blocks of
    both phases (each block compares runs that trained side by side)."""
    ratios = []
    for phase in (sweep, finals):
        a = [r for r in phase if r.optimizer_name == opt and r.lr == chosen[opt]]
        b = [r for r in phase if r.optimizer_name == base and r.lr == chosen[base]]
        if a and b:
            ratios.append(block_ratio(a, b, block, attr))
    ratios = [x for x in ratios if math.isfinite(x)]
    return statistics.median(ratios) if ratios else float("nan")


# ---------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# convergence: validation loss after {s['tokens']:,} tokens, each optimizer at its tuned learning rate", "",
             common.machine_markdown(result["machine"]), "", setup_markdown(s), "",
             "Optimizers: AdamW = torch AdamW (0.9, 0.95); Muon = lit_cosmos.MuonAdamW (torch Muon, match_rms_adamw, "
             f"+ AdamW on embeddings/head/norms); COSMOS = lit_cosmos.COSMOS (rank {s['rank']}, lr_ratio 0.2, gamma 0.2, "
             "refresh every step, AdamW on the rest); SOAP = pytorch_optimizer.SOAP on every parameter (refresh every "
             f"{SOAP_FREQUENCY} steps). Weight decay {WEIGHT_DECAY} (none on norms) for all.", ""]
    w = result["wall_clock"]
    lines.append(f"Wall clock: sweep {w['sweep_s'] / 60:.1f} min, seeds {w['seeds_s'] / 60:.1f} min, "
                 f"total {w['total_s'] / 60:.1f} min.")
    lines += ["", f"## Final ({s['seeds']} seed{'s' if s['seeds'] > 1 else ''} at the tuned lr; mean ± std over seeds)", ""]
    headers = ["optimizer", "lr", "final val loss", "best val loss", "final val ppl", "Δ final vs COSMOS (paired)",
               "train loss (last evals)", "opt step / AdamW", "train step / AdamW"]
    table = []
    for r in sorted(result["rows"], key=lambda r: (not math.isfinite(r["final_mean"]), r["final_mean"])):
        delta = r.get("delta_vs_cosmos_mean", float("nan"))
        delta_txt = "-" if not math.isfinite(delta) else (
            "0" if r["optimizer"] == "cosmos" else f"{delta:+.4f}" + (f" ± {r['delta_vs_cosmos_std']:.4f}"
                                                                    if math.isfinite(r["delta_vs_cosmos_std"]) else ""))
        table.append([r["label"], f"{r['lr']:g}", fmt_loss(r["final_mean"], r["final_std"]), fmt_loss(r["best_mean"], r["best_std"]),
                      f"{math.exp(r['final_mean']):.3f}" if math.isfinite(r["final_mean"]) else "-", delta_txt,
                      f"{r['final_train_loss_mean']:.4f}", r.get("opt_step_vs_adamw"), r.get("train_step_vs_adamw")])
    lines.append(common.markdown_table(headers, table))
    lines += ["", "Δ vs COSMOS: final validation loss minus COSMOS's on the same seed (same initial weights and "
              "batches), mean ± std over seeds. Step-time ratios: optimizer.step() alone, and forward + backward + "
              "step, to AdamW's, timed in lockstep in the same process (median over blocks).", "",
              f"## Learning-rate sweep (seed {s['seed']}; final validation loss, * = chosen)", ""]
    sweep_headers = ["optimizer"] + [f"lr {i + 1}" for i in range(max(len(g) for g in s["grids"].values()))]
    sweep_rows = []
    for o in s["optimizers"]:
        cells = [LABELS[o]]
        for entry in (e for e in result["sweep"] if e["optimizer"] == o):
            mark = "*" if result["chosen_lr"].get(o) == entry["lr"] else ""
            cells.append(f"{entry['lr']:g}: {fmt_loss(entry['final_val_loss'])}{mark}")
        sweep_rows.append(cells + [""] * (len(sweep_headers) - len(cells)))
    lines.append(common.markdown_table(sweep_headers, sweep_rows))
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def plot(result: dict[str, Any]):
    plt = common.pyplot()
    if plt is None:
        return None
    s = result["settings"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for r in result["rows"]:
        band = r["curve_band"]
        if band is None:
            continue
        tokens = [st * s["tokens_per_step"] / 1e6 for st in band["step"]]
        line, = ax.plot(tokens, band["mean"], label=f"{r['label']} (lr {r['lr']:g})")
        ax.fill_between(tokens, band["min"], band["max"], color=line.get_color(), alpha=0.2, lw=0)
    finals = [v for r in result["rows"] for v in r["final_val_loss"] if math.isfinite(v)]
    if finals:  # the start of training (~ln 257) would flatten the end, where the optimizers differ
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"mean over seeds, band = min..max", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for o in s["optimizers"]:
        pts = sorted((e["lr"], e["final_val_loss"]) for e in result["sweep"] if e["optimizer"] == o)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[o])
    ax2.set_xscale("log")
    lrs = sorted({e["lr"] for e in result["sweep"]})
    ax2.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45, fontsize=8)
    ax2.minorticks_off()
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("final validation loss")
    ax2.set_title(f"learning-rate sweep (seed {s['seed']})", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"convergence: {s['model']} ({s['parameters'] / 1e6:.2f}M params), {s['tokens']:,} tokens; "
                 f"{result['machine']['command']}", fontsize=8)
    return fig


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
