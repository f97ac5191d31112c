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

The runs of one phase train in lockstep in one process (:func:`zoo.bench.harness.train_lockstep`):
step t of every run, in an order that rotates every step, then step t + 1. Each run's
``optimizer.step()`` is timed alone (fwd/bwd apart), so step-time ratios are taken between runs
that met the same machine state; ratios to AdamW are per block of ``--block`` steps (a multiple
of SOAP's refresh period), median over blocks (see :mod:`zoo.bench.common`). The validation loss is the token-weighted mean over the
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
from functools import partial
from typing import Any, Callable, Optional

from zoo.bench import common
from zoo.bench.harness import (LABELS, OPTIMIZERS, SOAP_FREQUENCY, WEIGHT_DECAY, Data, Run, Setup, add_training_args,
                               block_ratio, build_optimizer, curve_band, fmt_loss, make_setup, mean_std, settings_dict,
                               setup_markdown, train_lockstep)

NAME = "convergence"

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
    setup, grids, optimizers, notes = _resolve(args)
    machine = common.machine_info(args.device, [NAME, *argv])
    common.warm_kernels()
    data = Data(setup, args.data_cache, args.data)
    make = partial(_make_run, setup=setup, data=data, rank=args.rank)
    sweep, finals, chosen, wall = _train(args, setup, data, grids, optimizers, make, notes)
    by_opt = {o: [r for r in sweep if r.optimizer_name == o and r.lr == chosen[o]]
              + [r for r in finals if r.optimizer_name == o] for o in chosen}
    rows = [_row(o, by_opt, sweep, finals, chosen, setup, args.block) for o in by_opt]
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
    return common.publish(args.out, result, to_markdown(result), plot(result))


def _resolve(args: argparse.Namespace) -> tuple[Setup, Grids, list[str], list[str]]:
    """The setup, the grids and the optimizers the command line asks for (and notes on what was left out)."""
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
    return setup, grids, optimizers, notes


def _make_run(opt: str, lr: float, seed: int, setup: Setup, data: Data, rank: int) -> Run:
    kwargs = {"rank": rank} if opt == "cosmos" else {}
    factory = partial(build_optimizer, opt, lr=lr, **kwargs)
    return Run.create(f"{opt}/lr={lr:g}/seed={seed}", opt, lr, seed, setup, data.vocab_size, factory)


Grids = dict[str, tuple[float, ...]]


def _train(args: argparse.Namespace, setup: Setup, data: Data, grids: Grids, optimizers: list[str],
           make: Callable[[str, float, int], Run], notes: list[str]
           ) -> tuple[list[Run], list[Run], dict[str, float], dict[str, float]]:
    """Phase 1, the learning-rate sweep on one seed; phase 2, the other seeds at the chosen rates
    (the sweep's run is the first seed). Returns both phases' runs, the chosen rates, wall clocks."""
    show = not args.no_progress
    sweep = [make(o, lr, args.seed) for o in optimizers for lr in grids[o]]
    wall = {"sweep_s": train_lockstep(sweep, setup, data, "lr sweep", show)}
    chosen = _choose(sweep, grids, optimizers, notes)
    for r in sweep:
        if chosen.get(r.optimizer_name) != r.lr:
            r.release()
    extra_seeds = list(range(args.seed + 1, args.seed + args.seeds))
    finals = [make(o, chosen[o], s) for o in optimizers if o in chosen for s in extra_seeds]
    wall["seeds_s"] = train_lockstep(finals, setup, data, "seeds", show) if finals else 0.0
    return sweep, finals, chosen, wall


def _choose(sweep: list[Run], grids: Grids, optimizers: list[str], notes: list[str]) -> dict[str, float]:
    """The learning rate with the lowest final validation loss per optimizer; notes on rates at
    the edge of their grid and on diverged runs."""
    chosen: dict[str, float] = {}
    for o in optimizers:
        ok = [r for r in sweep if r.optimizer_name == o and not r.diverged]
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
    return chosen


def _row(o: str, by_opt: dict[str, list[Run]], sweep: list[Run], finals: list[Run], chosen: dict[str, float],
         setup: Setup, block: int) -> dict[str, Any]:
    """Optimizer ``o``'s line of the final table: losses over seeds, paired deltas, step-time ratios."""
    runs = by_opt[o]
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
        row["opt_step_vs_adamw"] = _phase_ratio(o, "adamw", sweep, finals, chosen, block, "opt_s")
        row["train_step_vs_adamw"] = _phase_ratio(o, "adamw", sweep, finals, chosen, block, "train_s")
    return row


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
    ax.set_title("mean over seeds, band = min..max", fontsize=9)
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
