r"""GPU evidence pack: the optimizer step, its memory and a short training run, on one GPU in
eight minutes, written to ``docs/benchmarks/gpu/``.

Stages (in this order, each with a time cap; see *Budget*):

1. **optimizer step**, full-model shapes of ``llama-130m``, ``llama-350m`` and ``llama-1b``
   (:meth:`zoo.config.Config.from_name`, every block), bfloat16 parameters with random bfloat16
   gradients, routed by :func:`lit_cosmos.cosmos_param_groups` (hidden matrices; embeddings + head;
   norms without weight decay). Candidates, all over the same parameters:

   ====================  ==========================================================
   ``fused_adamw``       ``torch.optim.AdamW(fused=True)`` on every group
   ``muon``              :class:`lit_cosmos.MuonAdamW` (torch Muon + AdamW)
   ``cosmos``            ``COSMOS(groups)``: the defaults
   ``cosmos_bf16_state`` ``COSMOS(groups, state_dtype="bfloat16")``
   ``cosmos_fast_sub``   ``COSMOS(groups, subspace_dtype="bfloat16")``
   ``cosmos_compiled``   ``COSMOS(groups, compile=True)``
   ====================  ==========================================================

   A COSMOS option this version of :class:`lit_cosmos.COSMOS` does not take (checked with
   :func:`inspect.signature`) is recorded as "unavailable in this version", never dropped.
   Each candidate is built and warmed up alone: its first step (state, bases and, for the
   compiled one, ``torch.compile``) is timed apart and its peak memory above what was already
   allocated is read from ``torch.cuda.max_memory_allocated``. ``compile_s`` is how much longer
   the compiled candidate's first steps took than the defaults'. Then all candidates run
   interleaved rounds in rotating order (:class:`zoo.bench.common.InterleavedTimer`, a device
   sync around every timed step), and step-time ratios to fused AdamW and to Muon are medians of
   per-round ratios. A candidate that runs out of memory is recorded as ``"OOM"``.

   Memory: the state measured from ``optimizer.state`` against :func:`lit_cosmos.memory_report`
   with bytes per element of the candidate's state dtype (torch's AdamW and Muon keep state in
   the parameter dtype, bfloat16; COSMOS in float32 unless ``state_dtype`` says otherwise).

2. **convergence**: ``llama-60m`` (byte vocabulary) on the bundled corpus
   (:class:`zoo.data.TextDataModule`), COSMOS, Muon and AdamW trained in lockstep by
   :mod:`zoo.bench.harness` at one learning rate each (``--lr``; defaults: the rates the
   convergence benchmark chose on its small CPU setup, not re-tuned at this size). The number of
   steps is set from a short calibration so that the stage fits its cap, at most
   ``--max-epochs`` passes over the corpus (more would measure memorisation).

Budget: ``--budget-s`` (480) is split into planned caps (setup 15 s, the three models 70, 90 and
120 s, convergence 150 s, 35 s kept for writing). A stage is granted its planned cap or less,
when earlier stages overran: what is left minus the plans of the stages still to come. Within a
model's cap, what cannot shrink (building, first steps, compile) runs first and the timed rounds
get the rest: between 3 and ``--repeats`` (30) rounds; the convergence stage shrinks its step
count. A stage that cannot fit even at its minimum still runs every candidate, and the output
says it went over.

``--dry-run`` runs every stage on the CPU at tiny sizes (the same model names, cut to one small
block; a few steps; ``torch.compile`` with the ``eager`` backend, so the compiled candidate's
path runs without minutes of code generation): its figures mean nothing, it checks that the
pack works. ``--quick`` is the same tiny sizes on ``--device``.

Example::

    python -m zoo.bench gpu                       # on one GPU: writes docs/benchmarks/gpu/
    python -m zoo.bench gpu --dry-run             # CPU, seconds: writes bench_results/gpu_dry_run/
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from lit_cosmos import COSMOS, MuonAdamW, cosmos_param_groups, memory_report
from zoo.bench import common
from zoo.bench.harness import LABELS, Data, Run, Setup, block_ratio, build_optimizer, curve_band, train_lockstep
from zoo.config import Config
from zoo.model import GPT

NAME = "gpu"
MODELS = ("llama-130m", "llama-350m", "llama-1b")
DOCS_OUT = Path("docs/benchmarks/gpu")
DRY_OUT = Path("bench_results/gpu_dry_run")
UNAVAILABLE = "unavailable in this version"
OOM = "OOM"
BUDGET_S = 480.0
#: planned seconds per stage (the rest of the budget is kept for writing the results)
PLAN = {"setup": 15.0, "llama-130m": 70.0, "llama-350m": 90.0, "llama-1b": 120.0, "convergence": 150.0}
MIN_REPEATS = 3
MAX_REPEATS = 30
#: name -> (label, extra COSMOS arguments; None for the baselines)
CANDIDATES: dict[str, tuple[str, Optional[dict[str, Any]]]] = {
    "fused_adamw": ("AdamW (fused)", None),
    "muon": ("Muon + AdamW", None),
    "cosmos": ("COSMOS (defaults)", {}),
    "cosmos_bf16_state": ("COSMOS (bf16 state)", {"state_dtype": "bfloat16"}),
    "cosmos_fast_sub": ("COSMOS (fast subspace)", {"subspace_dtype": "bfloat16"}),
    "cosmos_compiled": ("COSMOS (compiled)", {"compile": True}),
}
CONV_OPTIMIZERS = ("adamw", "muon", "cosmos")
#: the rates the convergence benchmark chose on its default (CPU, llama-tiny) setup
CONV_LR = {"adamw": 4e-3, "muon": 1.6e-2, "cosmos": 8e-3}
#: tiny shapes of --dry-run / --quick (every model name keeps its place in the results)
TINY = dict(n_layer=1, n_embd=32, n_head=4, intermediate_size=64, vocab_size=96)
MiB = 2**20
_OOM = torch.cuda.OutOfMemoryError  # raised by the CUDA caching allocator (torch.OutOfMemoryError)


# ---------------------------------------------------------------------- budget
@dataclass
class Budget:
    """The pack's time budget: planned caps per stage, each granted only what is left of the
    total after the plans of the stages still to come."""

    total_s: float
    plan: dict[str, float]
    start: float = field(default_factory=time.perf_counter)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.start)

    def grant(self, stage: str) -> float:
        later = list(self.plan)[list(self.plan).index(stage) + 1:]
        return min(self.plan[stage], self.left() - sum(self.plan[s] for s in later) - self.reserve_s)

    @property
    def reserve_s(self) -> float:
        return max(0.0, self.total_s - sum(self.plan.values()))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time stage ``name``; the caller may add notes (``entry["note"]``)."""
        entry = {"planned_s": self.plan[name], "granted_s": self.grant(name), "note": None}
        self.stages[name] = entry
        t0 = time.perf_counter()
        try:
            yield entry
        finally:
            entry["used_s"] = time.perf_counter() - t0
            entry["within_cap"] = entry["used_s"] <= max(entry["granted_s"], 0.0)

    def to_dict(self) -> dict[str, Any]:
        used = time.perf_counter() - self.start
        return {"total_s": self.total_s, "used_s": used, "within_budget": used <= self.total_s,
                "reserve_s": self.reserve_s, "stages": self.stages}


def choose_repeats(round_s: float, left_s: float, most: int, least: int = MIN_REPEATS) -> tuple[int, bool]:
    """Rounds that fit in ``left_s`` at ``round_s`` each, within ``[least, most]``; and whether
    ``least`` rounds fit at all."""
    fit = int(left_s // round_s) if round_s > 0 and math.isfinite(round_s) else most
    return max(least, min(most, fit)), fit >= least


# ---------------------------------------------------------------------- candidates
def cosmos_candidate(groups: list[dict[str, Any]], lr: float, **options: Any) -> Union[COSMOS, str]:
    """``COSMOS(groups, lr=lr, **options)``, or the reason this version cannot build it (an
    option its constructor does not take), so that the pack runs before and after it gains one."""
    known = inspect.signature(COSMOS).parameters
    missing = [k for k in options if k not in known]
    if missing:
        return f"{UNAVAILABLE} (COSMOS takes no {', '.join(missing)})"
    return COSMOS(groups, lr=lr, **options)


def make_candidate(name: str, groups: list[dict[str, Any]], lr: float = 1e-3) -> Union[torch.optim.Optimizer, str]:
    """Candidate ``name`` of :data:`CANDIDATES` over fresh copies of the routed ``groups``."""
    fresh = [dict(g, params=list(g["params"])) for g in groups]
    if name == "fused_adamw":
        plain = [{"params": g["params"], **({"weight_decay": g["weight_decay"]} if "weight_decay" in g else {})}
                 for g in fresh]
        return torch.optim.AdamW(plain, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    if name == "muon":
        return MuonAdamW(fresh, lr=lr)
    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}; choose from {tuple(CANDIDATES)}")
    return cosmos_candidate(fresh, lr, **CANDIDATES[name][1])


def state_element_bytes(name: str, param_dtype: torch.dtype) -> int:
    """Bytes per state element the formulas assume for candidate ``name``: torch's AdamW and Muon
    keep state in the parameter dtype, COSMOS in its ``state_dtype`` (float32 by default)."""
    options = CANDIDATES[name][1]
    if options is None:
        return param_dtype.itemsize
    return 2 if options.get("state_dtype") == "bfloat16" else 4


def formula_bytes(name: str, groups: list[dict[str, Any]], param_dtype: torch.dtype) -> int:
    key = {"fused_adamw": "adamw", "muon": "muon"}.get(name, "cosmos")
    return memory_report(groups, bytes_per_element=state_element_bytes(name, param_dtype))[key]


def build_parameters(config: Config, dtype: torch.dtype, device: str, seed: int = 0) -> list[dict[str, Any]]:
    """The routed groups of ``config``'s whole model as real ``dtype`` parameters on ``device``,
    each with a random gradient (built on the device: a 1B model is slow to fill on a CPU)."""
    with torch.device("meta"):
        groups = cosmos_param_groups(GPT(config))
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for g in groups:
        params = []
        for _, meta in g["params"]:
            p = nn.Parameter(torch.randn(meta.shape, generator=gen, device=device, dtype=dtype).mul_(0.02))
            p.grad = torch.randn(meta.shape, generator=gen, device=device, dtype=dtype)
            params.append(p)
        out.append(dict(g, params=params))
    return out


class _Guarded:
    """An optimizer's ``step`` that turns an out-of-memory error into a recorded failure (and
    frees the optimizer), so one candidate cannot bring the pack down."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer: Optional[torch.optim.Optimizer] = optimizer
        self.failed: Optional[str] = None

    def step(self) -> None:
        if self.optimizer is None:
            return
        try:
            self.optimizer.step()
        except _OOM as err:
            self.failed = f"{OOM} during the timed rounds: {_first_line(err)}"
        if self.failed:  # outside the except block: its traceback holds the step's tensors
            self.optimizer = None
            _free_memory()


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0][:200]


def _free_memory() -> None:
    """Return what dropped optimizers held to the GPU (cycles first: the caching allocator only
    releases blocks no tensor uses)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _compiled_graphs() -> Optional[int]:
    """Graphs torch.compile has captured so far (None when the counter is not available)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter: its absence must not stop the pack
        return None


# ---------------------------------------------------------------------- stage 1: optimizer step
def warm_candidate(name: str, groups: list[dict[str, Any]], args: argparse.Namespace
                   ) -> tuple[dict[str, Any], Optional[common.Candidate], Optional[_Guarded]]:
    """Build candidate ``name`` alone, take its first step and ``--warmup`` more (each timed),
    and measure its memory. Returns its row, and the timer candidate when it is usable: an
    unavailable option, an out-of-memory error or any other failure is recorded in the row."""
    row: dict[str, Any] = {"candidate": name, "label": CANDIDATES[name][0], "status": "ok"}
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else None
    opt: Union[torch.optim.Optimizer, str, None] = None
    try:
        opt = make_candidate(name, groups)
        if isinstance(opt, str):
            row["status"] = opt
            return row, None, None
        guarded = _Guarded(opt)
        cand = common.Candidate(name, guarded.step, sync=common.device_sync(args.device))
        cand.first_step_s = cand.timed_step()
        row["first_step_s"] = cand.first_step_s
        row["warmup_step_s"] = [cand.timed_step() for _ in range(args.warmup)]
    except _OOM as err:
        row["status"] = f"{OOM}: {_first_line(err)}"
    except Exception as err:  # one broken candidate must not cost the other five their figures
        row["status"] = f"error: {type(err).__name__}: {_first_line(err)}"
        row["traceback"] = traceback.format_exc(limit=6)
    else:
        if guarded.failed:
            row["status"] = guarded.failed
    if row["status"] != "ok":
        opt = guarded = cand = None
        _free_memory()
        return row, None, None
    row.update(_memory(name, opt, groups, base))
    return row, cand, guarded


def _memory(name: str, opt: torch.optim.Optimizer, groups: list[dict[str, Any]], base: Optional[int]) -> dict[str, Any]:
    """Measured state bytes and dtypes, the formula's, and (on a GPU) what the allocator saw."""
    param_dtype = groups[0]["params"][0].dtype
    measured, formula = common.state_bytes(opt), formula_bytes(name, groups, param_dtype)
    out: dict[str, Any] = {
        "state_bytes": measured,
        "state_dtypes": sorted({str(t.dtype) for st in opt.state.values() for k, t in st.items()
                                if isinstance(t, torch.Tensor) and k != "step"}),
        "bytes_per_element_formula": state_element_bytes(name, param_dtype),
        "state_bytes_formula": formula,
        "state_vs_formula": measured / formula if formula else None,
        "resident_bytes": None, "peak_step_bytes": None, "peak_allocated_bytes": None,
    }
    if base is not None:
        torch.cuda.synchronize()
        out["resident_bytes"] = torch.cuda.memory_allocated() - base  # its state, as the allocator holds it
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_step_bytes"] = out["peak_allocated_bytes"] - base  # state + the step's workspace
    return out


def bench_model(model: str, args: argparse.Namespace, granted_s: float, entry: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 on one model: warm up every candidate alone, then interleaved rounds in what is
    left of ``granted_s``; one row per candidate."""
    t0 = time.perf_counter()
    config = Config.from_name(model, **(TINY if args.quick else {}))
    groups = build_parameters(config, torch.bfloat16, args.device, args.seed)
    rows, cands, guards = [], {}, {}
    for name in common.progress(CANDIDATES, len(CANDIDATES), f"{model} warm-up", not args.no_progress):
        row, cand, guarded = warm_candidate(name, groups, args)
        rows.append(row)
        if cand is not None:
            cands[name], guards[name] = cand, guarded
    round_s = sum(_steady(r) for r in rows if r["candidate"] in cands)
    least = min(args.repeats, 1 if args.quick else MIN_REPEATS)
    repeats, fits = choose_repeats(round_s, granted_s - (time.perf_counter() - t0), args.repeats, least)
    if not fits:
        entry["note"] = (f"{model}: {least} rounds ({least * round_s:.1f} s) did not fit in the "
                         f"{granted_s:.0f} s granted after building and warm-up; ran {repeats} anyway")
    graphs_before = _compiled_graphs()
    if cands:
        common.InterleavedTimer(list(cands.values()), warmup_steps=0, show_progress=not args.no_progress,
                                desc=model).run(repeats)
    graphs_after = _compiled_graphs()
    _aggregate(rows, cands, guards)
    numel = sum(p.numel() for g in groups for p in g["params"])
    matrices = sum(p.numel() for g in groups if g["algorithm"] == "cosmos" for p in g["params"])
    del groups, cands, guards, cand, guarded
    _free_memory()
    return {"model": model, "config": config.to_dict(), "numel": numel, "numel_matrices": matrices,
            "param_and_grad_bytes": 2 * 2 * numel, "repeats": repeats, "round_s_estimate": round_s,
            "fits": fits, "compiled_graphs_during_rounds": None if graphs_before is None or graphs_after is None
            else graphs_after - graphs_before, "rows": rows}


def _steady(row: dict[str, Any]) -> float:
    """A candidate's step seconds after its first: the last warm-up step (or the first step)."""
    return (row.get("warmup_step_s") or [row.get("first_step_s", 0.0)])[-1]


def _aggregate(rows: list[dict[str, Any]], cands: dict[str, common.Candidate], guards: dict[str, _Guarded]) -> None:
    """Fill in each usable row's times: median step, ratios to fused AdamW and Muon per round,
    first-steps overhead and, for the compiled candidate, the compile time."""
    for name, g in guards.items():
        if g.failed:
            next(r for r in rows if r["candidate"] == name)["status"] = g.failed
            del cands[name]
    base = {b: cands[b].rounds for b in ("fused_adamw", "muon") if b in cands}
    for r in rows:
        c = cands.get(r["candidate"])
        if c is None:
            continue
        r["step_ms"] = 1e3 * common.median(c.rounds)
        r["step_s_rounds"] = list(c.rounds)
        for b, b_rounds in base.items():
            r[f"vs_{b}"] = common.ratio_median(c.rounds, b_rounds)
        warm = [r["first_step_s"], *r["warmup_step_s"]]
        r["first_steps_overhead_s"] = sum(warm) - len(warm) * common.median(c.rounds)
    by = {r["candidate"]: r for r in rows}
    compiled, plain = by["cosmos_compiled"], by["cosmos"]
    if "first_steps_overhead_s" in compiled and "first_steps_overhead_s" in plain:
        compiled["compile_s"] = max(0.0, compiled["first_steps_overhead_s"] - plain["first_steps_overhead_s"])


def optimizer_step_stage(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    """Stage 1 on every model of ``--models``, each in its own time cap; a model that fails is
    recorded with its error and the next one still runs."""
    results = []
    for model in args.models:
        with budget.stage(model) as entry:
            try:
                results.append(bench_model(model, args, entry["granted_s"], entry))
            except Exception as err:  # keep the other models' figures
                _free_memory()
                results.append({"model": model, "error": f"{type(err).__name__}: {_first_line(err)}",
                                "traceback": traceback.format_exc(limit=6), "rows": []})
    return results


# ---------------------------------------------------------------------- stage 2: convergence
def conv_setup(args: argparse.Namespace, steps: int) -> Setup:
    """llama-60m (byte vocabulary) for ``steps`` steps: batch 8 x 256 tokens, 16 evaluations on
    16 validation batches (with --quick: one tiny block, 4 x 32 tokens, 2 evaluations on 2
    batches), 5 % warm-up, cosine to 0.1."""
    q = args.quick
    return Setup(model="llama-60m", overrides={k: v for k, v in TINY.items() if k != "vocab_size"} if q else {},
                 block_size=32 if q else 256, batch_size=4 if q else 8, steps=steps,
                 eval_every=max(1, steps // (2 if q else 16)), warmup_steps=max(1, round(0.05 * steps)),
                 min_lr_ratio=0.1, device=args.device, val_batches=2 if q else 16)


def _make_run(opt: str, lr: float, seed: int, setup: Setup, data: Data) -> Run:
    return Run.create(f"{opt}/lr={lr:g}/seed={seed}", opt, lr, seed, setup, data.vocab_size,
                      partial(build_optimizer, opt, lr=lr))


def calibrate(args: argparse.Namespace, setup: Setup, data: Data, untimed: int, timed: int) -> tuple[float, float]:
    """Seconds of one lockstep step of every optimizer (after ``untimed`` steps) and of one
    evaluation of every run, on throwaway runs (their own seed's batches: the real runs' stream
    is left alone)."""
    runs = [_make_run(o, args.lr[o], args.seed + 1000, setup, data) for o in CONV_OPTIMIZERS]
    sync = common.device_sync(args.device) or (lambda: None)
    for t in range(untimed + timed):
        if t == untimed:
            sync()
            t0 = time.perf_counter()
        batch = data.next_batch(args.seed + 1000)
        for r in runs:
            r.train_step(batch)
    sync()
    per_step = (time.perf_counter() - t0) / timed
    t1 = time.perf_counter()
    for r in runs:
        r.evaluate(data.val)
    return per_step, time.perf_counter() - t1


def convergence_stage(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    with budget.stage("convergence") as entry:
        t0 = time.perf_counter()
        q = args.quick
        most = 6 if q else 100_000
        data = Data(conv_setup(args, most), args.data_cache)
        epoch_steps = int(args.max_epochs * data.num_tokens["train"] // conv_setup(args, most).tokens_per_step)
        per_step, per_eval = calibrate(args, conv_setup(args, most), data, *((1, 2) if q else (3, 5)))
        left = entry["granted_s"] - (time.perf_counter() - t0)
        evals = len(conv_setup(args, most).eval_steps())
        fit = int((left - evals * per_eval) // per_step) if per_step > 0 else most
        least = most if q else 100
        steps = max(least, min(most, epoch_steps, fit))
        if fit < least:
            entry["note"] = (f"convergence: {least} steps (~{least * per_step + evals * per_eval:.0f} s) did not fit "
                             f"in the {entry['granted_s']:.0f} s granted; ran {steps} anyway")
        setup = conv_setup(args, steps)
        runs = [_make_run(o, args.lr[o], args.seed, setup, data) for o in CONV_OPTIMIZERS]
        train_s = train_lockstep(runs, setup, data, "convergence", not args.no_progress)
        return {
            "setup": {**asdict(setup), "tokens_per_step": setup.tokens_per_step,
                      "parameters": setup.config(data.vocab_size).num_parameters(),
                      "epochs": steps * setup.tokens_per_step / data.num_tokens["train"],
                      "corpus_tokens": dict(data.num_tokens)},
            "calibration": {"lockstep_step_s": per_step, "evaluation_s": per_eval, "steps_that_fit": fit,
                            "steps_of_max_epochs": epoch_steps},
            "train_s": train_s,
            "rows": [_conv_row(r, runs, setup) for r in runs],
        }


def _conv_row(r: Run, runs: list[Run], setup: Setup) -> dict[str, Any]:
    base = [x for x in runs if x.optimizer_name == "adamw"]
    block = max(1, setup.steps // 16)
    return {
        "optimizer": r.optimizer_name, "label": LABELS[r.optimizer_name], "lr": r.lr, "diverged": r.diverged,
        "final_val_loss": r.final_val, "best_val_loss": r.best_val,
        "curve": None if r.diverged else curve_band([r]),
        "opt_step_ms": 1e3 * statistics.median(r.opt_s[1:] or r.opt_s),
        "train_step_ms": 1e3 * statistics.median(r.train_s[1:] or r.train_s),
        "opt_step_vs_adamw": block_ratio([r], base, block, "opt_s"),
        "train_step_vs_adamw": block_ratio([r], base, block, "train_s"),
    }


# ---------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    gpu = result["gpu"]
    title = gpu["name"] if gpu.get("available") else "dry run on the CPU (tiny sizes: the figures mean nothing)"
    lines = [f"# gpu: GPU evidence pack, {title}", "", common.machine_markdown(result["machine"]), "",
             "GPU: " + ", ".join(f"{k} {v}" for k, v in gpu.items() if k != "available"), "",
             *_md_budget(result["budget"])]
    if result["optimizer_step"]:
        lines += _md_optimizer_step(result["optimizer_step"])
    if result["convergence"]:
        lines += _md_convergence(result["convergence"])
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def _md_budget(budget: dict[str, Any]) -> list[str]:
    rows = [[k, s["planned_s"], s["granted_s"], s.get("used_s"),
             "running" if "within_cap" not in s else "yes" if s["within_cap"] else "NO"]
            for k, s in budget["stages"].items()]
    return [f"## Time budget: {budget['used_s']:.0f} s of {budget['total_s']:.0f} s "
            f"({'within' if budget['within_budget'] else 'OVER'} budget)", "",
            common.markdown_table(["stage", "planned s", "granted s", "used s", "within cap"], rows),
            *[f"\n{s['note']}." for s in budget["stages"].values() if s.get("note")]]


def _md_optimizer_step(models: list[dict[str, Any]]) -> list[str]:
    lines = []
    headers = ["candidate", "status", "step ms", "vs fused AdamW", "vs Muon", "first step s", "compile s",
               "state MiB", "formula MiB", "state / formula", "peak over base MiB", "state dtypes"]
    for m in models:
        if "error" in m:
            lines += ["", f"## Optimizer step: {m['model']}", "", f"FAILED: {m['error']}"]
            continue
        lines += ["", f"## Optimizer step: {m['model']} full model ({_count(m['numel'])} parameters, bf16; "
                      f"{m['repeats']} interleaved rounds)", ""]
        rows = [[r["label"], r["status"], r.get("step_ms"), r.get("vs_fused_adamw"), r.get("vs_muon"),
                 r.get("first_step_s"), r.get("compile_s"), _mib(r.get("state_bytes")),
                 _mib(r.get("state_bytes_formula")), r.get("state_vs_formula"), _mib(r.get("peak_step_bytes")),
                 " ".join(r.get("state_dtypes", []))] for r in m["rows"]]
        lines.append(common.markdown_table(headers, rows))
        if m.get("compiled_graphs_during_rounds"):
            lines.append(f"\ntorch.compile captured {m['compiled_graphs_during_rounds']} new graph(s) during the "
                         "timed rounds: the compiled candidate's times include that compilation.")
    lines += ["", "Times: medians over rounds; ratios: per-round medians against candidates timed in the same "
              "rounds. First step: state, bases and compilation. Formula: lit_cosmos.memory_report at the bytes "
              "per element of each candidate's state dtype. Peak over base: torch.cuda.max_memory_allocated "
              "during the candidate's first steps above what was allocated before it was built."]
    return lines


def _md_convergence(conv: dict[str, Any]) -> list[str]:
    s = conv["setup"]
    rows = [[r["label"], f"{r['lr']:g}", r["final_val_loss"], r["best_val_loss"], r["opt_step_ms"],
             r["opt_step_vs_adamw"], r["train_step_ms"], r["train_step_vs_adamw"]] for r in conv["rows"]]
    return ["", f"## Convergence: {s['model']} ({_count(s['parameters'])} parameters, byte tokens), "
                f"{s['steps']} steps of {s['batch_size']} x {s['block_size']} tokens ({s['epochs']:.2f} epochs)", "",
            common.markdown_table(["optimizer", "lr", "final val loss", "best val loss", "opt step ms",
                                   "opt step / AdamW", "train step ms", "train step / AdamW"], rows),
            "", "One seed, one learning rate per optimizer (not tuned at this size); trained in lockstep, "
                f"{conv['train_s']:.0f} s."]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _mib(v: Optional[float]) -> Optional[float]:
    return None if v is None else v / MiB


def plot(result: dict[str, Any]):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    _plot_ratios(axes[0], result["optimizer_step"], "vs_fused_adamw", "step time / fused AdamW")
    _plot_memory(axes[1], result["optimizer_step"])
    _plot_curves(axes[2], result["convergence"])
    fig.suptitle(f"gpu evidence pack: {result['gpu'].get('name') or 'dry run on CPU'}; "
                 f"{result['machine']['command']}", fontsize=9)
    return fig


def _plot_ratios(ax: Any, models: list[dict[str, Any]], key: str, title: str) -> None:
    names = list(CANDIDATES)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next((r.get(key) or float("nan") for r in m["rows"] if r["candidate"] == name), float("nan"))
                for m in models]
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=CANDIDATES[name][0], color=f"C{i}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")  # fused AdamW is an order of magnitude faster than the matrix optimizers
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [m["model"] for m in models])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)  # one legend: the memory panel uses the same colours


def _plot_memory(ax: Any, models: list[dict[str, Any]]) -> None:
    """Optimizer state relative to fused AdamW's: bars measured, dots the formulas."""
    names = list(CANDIDATES)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, measured, formula = [], [], []
        for j, m in enumerate(models):
            by = {r["candidate"]: r for r in m["rows"]}
            base, r = by.get("fused_adamw", {}), by.get(name, {})
            if r.get("state_bytes") and base.get("state_bytes"):
                xs.append(j + i * width)
                measured.append(r["state_bytes"] / base["state_bytes"])
                formula.append(r["state_bytes_formula"] / base["state_bytes_formula"])
        ax.bar(xs, measured, width, color=f"C{i}")
        ax.plot(xs, formula, "k.", ms=5)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [m["model"] for m in models])
    ax.set_title("optimizer state / fused AdamW's (bars measured, dots formula)", fontsize=9)


def _plot_curves(ax: Any, conv: Optional[dict[str, Any]]) -> None:
    if conv:
        for r in conv["rows"]:
            if r["curve"]:
                ax.plot(r["curve"]["step"], r["curve"]["mean"], label=f"{r['label']} (lr {r['lr']:g})")
        ax.set_title(f"{conv['setup']['model']}: validation loss", fontsize=9)
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------- machine
def gpu_info(device: str) -> dict[str, Any]:
    """The GPU, its driver and the CUDA runtime torch was built with, and the matmul settings
    that change what "float32" means on it."""
    info: dict[str, Any] = {"available": str(device).startswith("cuda") and torch.cuda.is_available(),
                            "cuda_runtime": torch.version.cuda, "torch": torch.__version__}
    if not info["available"]:
        return info
    props = torch.cuda.get_device_properties(torch.device(device))
    info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1),
                multiprocessors=props.multi_processor_count, driver=_driver_version(),
                cudnn=torch.backends.cudnn.version(), float32_matmul_precision=torch.get_float32_matmul_precision(),
                allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _memory_summary(device: str) -> Optional[dict[str, int]]:
    if not str(device).startswith("cuda"):
        return None
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_ooms", "num_alloc_retries", "allocated_bytes.all.peak",
                                               "reserved_bytes.all.peak")}


@contextlib.contextmanager
def eager_compile() -> Iterator[None]:
    """``torch.compile`` with the ``eager`` backend for the duration: dynamo still traces (the
    compiled candidate's path runs) but generates no kernels, which takes minutes on a CPU."""
    real = torch.compile

    def compile_eager(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        kwargs.pop("options", None)
        return real(*args, **{**kwargs, "backend": "eager"})

    torch.compile = compile_eager
    try:
        yield
    finally:
        torch.compile = real


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    p.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes on the CPU (seconds)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"time budget of the pack (default {BUDGET_S:g})")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="optimizer-step models")
    p.add_argument("--stages", nargs="+", default=["optimizer_step", "convergence"],
                   choices=["optimizer_step", "convergence"])
    p.add_argument("--lr", action="append", metavar="OPT=LR", help="convergence learning rate of OPT (repeatable); "
                   "defaults " + ", ".join(f"{k} {v:g}" for k, v in CONV_LR.items()))
    p.add_argument("--max-epochs", type=float, default=2.0, help="most passes over the corpus in the convergence stage")
    p.add_argument("--data-cache", default="data", help="where the tokenized corpus is prepared (default ./data)")
    p.set_defaults(device=None)
    return p


def _resolve(args: argparse.Namespace) -> None:
    """Device, output folder, repeats, learning rates; every bad value names its flag."""
    if args.dry_run:
        if args.device not in (None, "cpu"):
            raise SystemExit(f"--dry-run runs on the CPU; drop --device {args.device}")
        args.device, args.quick = "cpu", True
        # one thread: tiny matrices gain nothing from more, and a busy machine's spinning threads cost a lot
        args.threads = args.threads or 1
    args.device = args.device or "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is visible; `--dry-run` runs every stage on the CPU")
    if args.out is None:
        args.out = DRY_OUT if args.dry_run else (Path("bench_results") / NAME if args.quick else DOCS_OUT)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else MAX_REPEATS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.budget_s <= 0 or args.max_epochs <= 0:
        raise SystemExit(f"--budget-s and --max-epochs must be > 0, got {args.budget_s:g} and {args.max_epochs:g}")
    args.lr = _parse_lrs(args.lr)


def _parse_lrs(items: Optional[list[str]]) -> dict[str, float]:
    lrs = dict(CONV_LR)
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if name not in CONV_OPTIMIZERS or not (math.isfinite(lr) and lr > 0):
            raise SystemExit(f"--lr takes OPT=LR with OPT in {CONV_OPTIMIZERS} and LR > 0, got {item!r}")
        lrs[name] = lr
    return lrs


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the pack with command-line arguments ``argv``; returns the result dict."""
    argv = list(argv or [])
    args = build_parser().parse_args(argv)
    _resolve(args)
    common.apply_common_args(args, NAME)
    tiny_cpu = args.quick and args.device == "cpu"
    with common.torch_threads(args.threads), (eager_compile() if tiny_cpu else contextlib.nullcontext()):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    budget = Budget(args.budget_s if not args.quick else min(args.budget_s, BUDGET_S / 8), _plan(args))
    result: dict[str, Any] = {"benchmark": NAME, "partial": True}
    with budget.stage("setup"):
        result.update(machine=common.machine_info(args.device, [NAME, *argv]), gpu=gpu_info(args.device),
                      settings={**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                "compile_backend": "eager" if args.quick and args.device == "cpu" else "inductor"},
                      candidates={k: {"label": lab, "cosmos_options": opts} for k, (lab, opts) in CANDIDATES.items()},
                      notes=[], optimizer_step=[], convergence=None)
        common.warm_kernels()
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("optimizer_step", lambda: optimizer_step_stage(args, budget)),
        ("convergence", lambda: convergence_stage(args, budget)),
    ]
    for name, stage in stages:
        if name in args.stages:
            result[name] = _checkpoint(result, stage, name, args, budget)
        else:
            result["notes"].append(f"stage {name} not run (--stages {' '.join(args.stages)})")
    result.update(partial=False, budget=budget.to_dict(), memory_stats=_memory_summary(args.device))
    return common.publish(args.out, result, to_markdown(result), plot(result))


def _plan(args: argparse.Namespace) -> dict[str, float]:
    """Planned caps of the stages that run (an eighth of them for the tiny sizes)."""
    names = ["setup", *(args.models if "optimizer_step" in args.stages else []),
             *(["convergence"] if "convergence" in args.stages else [])]
    return {k: PLAN[k] / (8 if args.quick else 1) for k in names}


def _checkpoint(result: dict[str, Any], stage: Callable[[], Any], name: str, args: argparse.Namespace,
                budget: Budget) -> Any:
    """Run one stage, then write what is known so far (a pack stopped later keeps it); an error
    in one stage is recorded and the next stage still runs."""
    try:
        value = stage()
    except Exception as err:  # the pack reports a broken stage instead of losing the others
        result["notes"].append(f"stage {name} failed: {type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}")
        value = result.get(name)
    partial_result = {**result, name: value, "budget": budget.to_dict()}
    common.write_results(args.out, partial_result, to_markdown(partial_result))
    return value


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
