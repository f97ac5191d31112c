r"""How often must COSMOS refresh its eigenbasis? Validation loss and ``optimizer.step()`` time
with a refresh every 1, 4 and 16 steps and with the adaptive schedule.

The training setup is :mod:`zoo.bench.convergence`'s (same model, data, token budget and
warmup-cosine schedule, trained by :mod:`zoo.bench.harness`; see there), with COSMOS at one
learning rate (``--lr``; the default is the rate the convergence sweep chose for COSMOS on the
default setup). Variants:

============  =======================================================================
``ui=1``      ``COSMOS(update_interval=1)``: a power-iteration refresh on every step (paper).
``ui=4``      ``COSMOS(update_interval=4)``: on steps 4, 8, ...; the other steps accumulate
              the projected second moment ``S`` in the current basis.
``ui=16``     ``COSMOS(update_interval=16)``.
``adaptive``  :class:`lit_cosmos.RefreshSchedule` ``("adaptive")`` (the schedule of the
              ``EigenbasisRefresh`` callback, for a plain loop) with its defaults (start gap 1,
              gap x2 when the basis drift is < 0.01, / 2 when > 0.1, gaps 1..100).
============  =======================================================================

Every variant trains ``--seeds`` seeds (same initial weights and batches per seed across variants),
all in lockstep in one process, the order rotating every step, so step-time ratios compare
steps taken side by side. Timed: ``optimizer.step()`` alone (including the adaptive callback's
hooks, which measure the drift on refresh steps), and forward + backward + step. Ratios to
``ui=1`` are per block of ``--block`` steps (16: every block holds exactly one ``ui=16`` and four
``ui=4`` refreshes), median over blocks.

Refreshes are *measured*: a refresh is a step (after the first, which builds the basis) on which
any basis ``U`` changed; the count is checked against the schedule's own (``steps // k`` for
``ui=k > 1``, ``steps - 1`` for ``ui=1``, the callback's counter for ``adaptive``).

Example::

    python -m zoo.bench refresh --out /tmp/bench_results/refresh          # ~15 min on 1 CPU thread
    python -m zoo.bench refresh --quick --out /tmp/refresh                 # seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from typing import Any, Optional

import torch

from lit_cosmos import RefreshSchedule
from zoo.bench import common
from zoo.bench.harness import (Data, Run, Setup, add_training_args, block_ratio, build_optimizer, curve_band, fmt_loss,
                               make_setup, mean_std, settings_dict, setup_markdown, train_lockstep)

NAME = "refresh"
INTERVALS = (1, 4, 16)
#: COSMOS's learning rate chosen by the convergence sweep on the default setup.
DEFAULT_LR = 8e-3
BLOCK = 16
#: RefreshSchedule settings recorded with the results (the adaptive variant uses its defaults).
ADAPTIVE_KEYS = ("interval", "growth", "min_interval", "max_interval", "drift_low", "drift_high", "drift_reduce")


class _RefreshCounter:
    """Counts the steps on which any COSMOS basis ``U`` changed (outside the timed region)."""

    def __init__(self) -> None:
        self.before: dict[str, list[torch.Tensor]] = {}

    def snapshot(self, run: Run) -> None:
        if not run.diverged:
            self.before[run.key] = [st["U"].clone() for _, _, st in run.optimizer.matrix_states()]

    def compare(self, run: Run) -> None:
        old = self.before.pop(run.key, None)
        if old is None or run.diverged:
            return
        new = [st["U"] for _, _, st in run.optimizer.matrix_states()]
        if old and len(old) == len(new) and any(not torch.equal(a, b) for a, b in zip(old, new)):
            run.extra.setdefault("refresh_steps", []).append(run.step)


def variant_names(intervals: tuple[int, ...], adaptive: bool) -> list[str]:
    return [f"ui={k}" for k in intervals] + (["adaptive"] if adaptive else [])


def expected_refreshes(variant: str, steps: int) -> Optional[int]:
    """Refreshes the constant schedules take in ``steps`` steps (step 1 builds the basis)."""
    if not variant.startswith("ui="):
        return None
    k = int(variant[3:])
    return steps - 1 if k == 1 else steps // k


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    add_training_args(p)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"COSMOS learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--rank", type=int, default=64, help="COSMOS rank")
    p.add_argument("--intervals", type=int, nargs="+", default=list(INTERVALS), help="constant update_interval values")
    p.add_argument("--no-adaptive", action="store_true", help="leave out the adaptive schedule")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; 1 with --quick)")
    p.set_defaults(threads=1)
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict."""
    return common.run_benchmark(build_parser, NAME, _run, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    t_start = time.perf_counter()
    setup, intervals = _resolve(args)
    machine = common.machine_info(args.device, [NAME, *argv])
    common.warm_kernels()
    data = Data(setup, args.data_cache, args.data)
    variants = variant_names(intervals, not args.no_adaptive)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs, schedules = _build_runs(args, setup, data, variants, seeds)
    counter = _RefreshCounter()
    wall = {"train_s": train_lockstep(runs, setup, data, "refresh variants", not args.no_progress,
                                      before_step=counter.snapshot, after_step=counter.compare)}
    for sched, _ in schedules.values():
        sched.detach()
    notes: list[str] = []
    base = [r for r in runs if r.extra["variant"] == "ui=1"]
    rows = [_variant_row(v, [r for r in runs if r.extra["variant"] == v], base, schedules, args.block, notes)
            for v in variants]
    wall["total_s"] = time.perf_counter() - t_start
    result = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {**settings_dict(args, setup, data), "variants": variants, "seeds_used": seeds,
                     "adaptive": {k: getattr(RefreshSchedule("adaptive"), k) for k in ADAPTIVE_KEYS}},
        "notes": notes,
        "wall_clock": wall,
        "rows": rows,
        "runs": [{k: v for k, v in r.summary().items() if k != "train_loss"} for r in runs],
    }
    return common.publish(args.out, result, to_markdown(result), plot(result))


def _resolve(args: argparse.Namespace) -> tuple[Setup, tuple[int, ...]]:
    """The training setup and the constant intervals, validated."""
    setup = make_setup(args, block_default=4 if args.quick else BLOCK)
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    bad_lr = not (math.isfinite(args.lr) and args.lr > 0)
    if args.seeds < 1 or args.rank < 0 or any(k < 1 for k in args.intervals) or bad_lr:
        raise SystemExit("--seeds and --intervals must be >= 1, --rank >= 0, --lr > 0")
    if 1 not in args.intervals:
        raise SystemExit("--intervals must include 1: it is the baseline of the ratios")
    return setup, tuple(sorted(set(args.intervals)))


Schedules = dict[str, tuple[RefreshSchedule, list[dict[str, float]]]]


def _build_runs(args: argparse.Namespace, setup: Setup, data: Data, variants: list[str],
                seeds: list[int]) -> tuple[list[Run], Schedules]:
    """One run per variant and seed; the adaptive runs get a schedule that logs into a list."""
    runs: list[Run] = []
    schedules: Schedules = {}
    for variant in variants:
        ui = int(variant[3:]) if variant.startswith("ui=") else 1
        factory = partial(build_optimizer, "cosmos", lr=args.lr, rank=args.rank, update_interval=ui)
        for seed in seeds:
            r = Run.create(f"{variant}/seed={seed}", "cosmos", args.lr, seed, setup, data.vocab_size, factory)
            r.extra["variant"] = variant
            if variant == "adaptive":
                logs: list[dict[str, float]] = []  # what the schedule logs (count, gap, drift) per step
                sched = RefreshSchedule("adaptive", log_fn=lambda m, t, logs=logs: logs.append({"step": t, **m}))
                schedules[r.key] = (sched.attach(r.optimizer), logs)
            runs.append(r)
    return runs, schedules


def _variant_row(variant: str, vr: list[Run], base: list[Run], schedules: Schedules, block: int,
                 notes: list[str]) -> dict[str, Any]:
    """One variant's line: refreshes measured against the schedule's, losses, step-time ratios."""
    counts = [len(r.extra.get("refresh_steps", [])) for r in vr]
    expected = [schedules[r.key][0].refreshes if variant == "adaptive" else expected_refreshes(variant, r.step)
                for r in vr]
    if counts != expected and not any(r.diverged for r in vr):
        notes.append(f"{variant}: measured refreshes {counts} differ from the schedule's {expected}.")
    fin, best = [r.final_val for r in vr], [r.best_val for r in vr]
    paired = [a.final_val - b.final_val for a, b in zip(vr, base)]  # same seed: same weights and batches
    row = {
        "variant": variant, "seeds": [r.seed for r in vr], "refreshes": counts, "refreshes_expected": expected,
        "final_val_loss": fin, "best_val_loss": best,
        **dict(zip(("final_mean", "final_std"), mean_std(fin))), **dict(zip(("best_mean", "best_std"), mean_std(best))),
        **dict(zip(("delta_vs_ui1_mean", "delta_vs_ui1_std"), mean_std(paired))),
        "opt_step_vs_ui1": block_ratio(vr, base, block, "opt_s"),
        "train_step_vs_ui1": block_ratio(vr, base, block, "train_s"),
        "opt_step_ms": 1e3 * statistics.median(s for r in vr for s in r.opt_s[1:]),
        "diverged": [r.key for r in vr if r.diverged],
        "curve_band": curve_band([r for r in vr if not r.diverged]) if any(not r.diverged for r in vr) else None,
        "refresh_steps_first_seed": vr[0].extra.get("refresh_steps", []),
    }
    row.update(_refresh_step_times(vr))
    if variant == "adaptive":
        row["adaptive_logs"] = [schedules[r.key][1] for r in vr]
    for r in vr:
        if r.diverged:
            notes.append(f"run {r.key} diverged ({r.diverged}).")
    return row


def _refresh_step_times(vr: list[Run]) -> dict[str, float]:
    """Median ``optimizer.step()`` milliseconds on refresh steps and on the other steps (the first
    left out), and the median ratio of each refresh step to its plain neighbours."""
    refresh_steps = [(r, set(r.extra.get("refresh_steps", []))) for r in vr]
    on = [r.opt_s[t - 1] for r, ts in refresh_steps for t in ts]
    off = [s for r, ts in refresh_steps for t, s in enumerate(r.opt_s[1:], start=2) if t not in ts]
    if not (on and off):
        return {}
    # Each refresh step against the plain steps right before and after it in the same run
    # (taken moments apart), median over refreshes.
    local = [r.opt_s[t - 1] / statistics.fmean(r.opt_s[u - 1] for u in (t - 1, t + 1))
             for r, ts in refresh_steps for t in ts
             if t - 1 >= 2 and t + 1 <= len(r.opt_s) and t - 1 not in ts and t + 1 not in ts]
    return {"refresh_step_ms": 1e3 * statistics.median(on), "plain_step_ms": 1e3 * statistics.median(off),
            "refresh_vs_plain_step": statistics.median(local) if local else float("nan")}


# ---------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# refresh: COSMOS eigenbasis refresh every 1, 4, 16 steps and adaptive ({s['tokens']:,} tokens)", "",
             common.machine_markdown(result["machine"]), "", setup_markdown(s), "",
             f"COSMOS lr {s['lr']:g}, rank {s['rank']}, other settings default; {len(s['seeds_used'])} seeds per variant "
             f"(seeds {s['seeds_used']}), the same initial weights and batches per seed in every variant.", "",
             f"Wall clock: training {result['wall_clock']['train_s'] / 60:.1f} min, total "
             f"{result['wall_clock']['total_s'] / 60:.1f} min.", ""]
    headers = ["variant", "refreshes", "final val loss", "Δ vs ui=1 (paired)", "best val loss",
               "opt step / ui=1", "train step / ui=1", "refresh step / plain step"]
    table = []
    for r in result["rows"]:
        counts = r["refreshes"] if len(set(r["refreshes"])) > 1 else r["refreshes"][:1]
        table.append([r["variant"], "/".join(str(c) for c in counts), fmt_loss(r["final_mean"], r["final_std"]),
                      "0" if r["variant"] == "ui=1" else _fmt_delta(r["delta_vs_ui1_mean"], r["delta_vs_ui1_std"]),
                      fmt_loss(r["best_mean"], r["best_std"]), r["opt_step_vs_ui1"], r["train_step_vs_ui1"],
                      r.get("refresh_vs_plain_step")])
    lines.append(common.markdown_table(headers, table))
    lines += ["", "Refreshes: measured, steps after the first on which a basis changed (per seed when they differ). "
              "Δ vs ui=1: final validation loss minus ui=1's on the same seed, mean ± std over seeds. Ratios: "
              "optimizer.step() alone, and forward + backward + step, to ui=1's, timed in lockstep in the same "
              f"process (median over blocks of {s['block']} steps); refresh step / plain step: optimizer.step() on a "
              "refresh step over the plain steps just before and after it in the same run (median)."]
    for r in result["rows"]:
        if r["variant"] == "adaptive" and r.get("adaptive_logs"):
            lines.append("\n" + _adaptive_summary(r["adaptive_logs"], r["seeds"], s["adaptive"]))
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def _adaptive_summary(logs: list[list[dict[str, Any]]], seeds: list[int], cfg: dict[str, Any]) -> str:
    """The adaptive schedule's gap changes (first seed) and the drift it measured (all seeds)."""
    changes, gap = [], None
    for x in logs[0]:
        if "refresh/interval" in x and x["refresh/interval"] != gap:
            gap = x["refresh/interval"]
            drift = x.get("refresh/drift_max")
            changes.append(f"step {int(x['step'])}: gap {int(gap)}" + (f" (drift {drift:.4f})" if drift is not None else ""))
    drifts = sorted(x["refresh/drift_max"] for log in logs for x in log if "refresh/drift_max" in x)
    text = f"Adaptive schedule, seed {seeds[0]}: " + ", ".join(changes) + "."
    if drifts:
        text += (f" Drift (max over matrices) measured at the refreshes of all seeds: median {statistics.median(drifts):.4f}, "
                 f"min {drifts[0]:.4f}, max {drifts[-1]:.4f} (the gap grows x{cfg['growth']:g} below {cfg['drift_low']:g} "
                 f"and shrinks / {cfg['growth']:g} above {cfg['drift_high']:g}, within {cfg['min_interval']}..{cfg['max_interval']}).")
    return text


def _fmt_delta(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:+.4f}" + (f" ± {std:.4f}" if math.isfinite(std) else "")


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
        counts = r["refreshes"] if len(set(r["refreshes"])) > 1 else r["refreshes"][:1]
        line, = ax.plot(tokens, band["mean"], label=f"{r['variant']} ({'/'.join(map(str, counts))} refreshes)")
        ax.fill_between(tokens, band["min"], band["max"], color=line.get_color(), alpha=0.2, lw=0)
        steps = r["refresh_steps_first_seed"]
        ax2.step([0, *steps, s["steps"]], [0, *range(1, len(steps) + 1), len(steps)], where="post", label=r["variant"],
                 color=line.get_color())
    finals = [v for r in result["rows"] for v in r["final_val_loss"] if math.isfinite(v)]
    if finals:
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("COSMOS, mean over seeds, band = min..max", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_yscale("symlog")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel(f"refreshes so far (seed {s['seeds_used'][0]})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"refresh: {s['model']} ({s['parameters'] / 1e6:.2f}M params), {s['tokens']:,} tokens; "
                 f"{result['machine']['command']}", fontsize=8)
    return fig


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
