"""Time per ``optimizer.step()`` and optimizer-state bytes on the parameter shapes of zoo models.

What is timed: ``step()`` alone, on parameters and random gradients built directly from a
:class:`zoo.config.Config` (no forward or backward pass). By default the model is cut to ONE
transformer block plus the embeddings, final norm and output head (``n_layer=1``); ``--full``
takes every block. Parameters are routed exactly as in training, by
:func:`lit_cosmos.cosmos_param_groups` on the model built on the meta device: the block's linear
weights are the *matrices*, everything else (embeddings, head, norms) is the *rest*.

Candidates (every one is "matrix optimizer on the matrices + AdamW on the rest", as in practice):

==================  =====================================  ================================
name                matrices                               rest
==================  =====================================  ================================
AdamW               ``torch.optim.AdamW``                  ``torch.optim.AdamW``
Muon                ``torch.optim.Muon`` (2-D only)        ``torch.optim.AdamW``
COSMOS              ``lit_cosmos.COSMOS`` (update_int. 1)  COSMOS's own AdamW groups
COSMOS (ui=k)       ``lit_cosmos.COSMOS`` (update_int. k)  COSMOS's own AdamW groups
SOAP                ``pytorch_optimizer.SOAP`` (freq 10)   ``torch.optim.AdamW``
GaLore              ``pytorch_optimizer.GaLore`` (gap 200) ``torch.optim.AdamW``
==================  =====================================  ================================

SOAP and GaLore are skipped, with a note, when ``pytorch-optimizer`` is not installed
(``pip install lit-cosmos[bench]``). The matrix and rest parts are separate optimizers stepped
one after the other, so each part is timed on its own and a candidate's time is the sum of its
parts. All candidates share the same parameter and gradient tensors: parameter values do not
change the cost of a step, and sharing keeps memory at one model.

How it is timed (see :mod:`zoo.bench.common`): each part's first step is timed alone and
reported separately (it allocates state; COSMOS builds its basis with ``eigh``, SOAP its
eigenbases, GaLore its SVD), then ``--warmup`` untimed steps, then ``--repeats`` interleaved
rounds in rotating order; in each round a part runs a block of steps that is a multiple of its
refresh period (COSMOS ui=k: k, SOAP: 10), so periodic refreshes are amortised exactly.
GaLore refreshes its SVD only every 200 steps: its figure is the steady state between
refreshes, and its first step gives the cost of one refresh. Ratios to AdamW and Muon are taken
round by round and the median reported.

State bytes are measured from ``optimizer.state`` (every tensor, nested ones included, step
counters left out) and compared with :mod:`lit_cosmos.core.memory`'s formulas; for COSMOS the two
must be equal exactly. The formula ratios of the *full* model are reported too.

Example::

    python -m zoo.bench optimizer_step --models llama-60m llama-130m
    python -m zoo.bench optimizer_step --models llama-130m --full --optimizers adamw muon cosmos
    python -m zoo.bench optimizer_step --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from typing import Any, Callable, Optional

import torch
from torch import nn

from lit_cosmos import COSMOS, cosmos_param_groups, memory_report, optimizer_state_bytes
from zoo.bench import common
from zoo.config import Config
from zoo.model import GPT

NAME = "optimizer_step"
OPTIMIZERS = ("adamw", "muon", "cosmos", "cosmos_ui", "soap", "galore")
DEFAULT_MODELS = ("llama-60m", "llama-130m", "llama-350m")
QUICK_MODELS = ("debug",)
SOAP_FREQUENCY = 10
GALORE_GAP = 200
TARGET_VS_MUON = 1.1  # product brief: COSMOS step time <= 1.1x torch Muon's on llama-130m shapes
MiB = 2**20


def _have_pytorch_optimizer() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- parameters
def build_parameters(config: Config, seed: int = 0, device: str = "cpu") -> tuple[list[tuple[str, nn.Parameter]], list[dict[str, Any]]]:
    """Real float32 parameters with random gradients for every trainable tensor of ``config``.

    Routes the model (built on the meta device, so nothing is allocated) with
    :func:`cosmos_param_groups`, then materialises each parameter. Returns the ``(name, param)``
    matrices and the AdamW groups of the rest (with their routed weight decay).
    """
    with torch.device("meta"):
        model = GPT(config)
    groups = cosmos_param_groups(model)
    gen = torch.Generator().manual_seed(seed)
    matrices: list[tuple[str, nn.Parameter]] = []
    rest_groups: list[dict[str, Any]] = []
    for g in groups:
        made = []
        for name, meta in g["params"]:
            p = nn.Parameter((torch.randn(meta.shape, generator=gen) * 0.02).to(device))
            p.grad = torch.randn(meta.shape, generator=gen).to(device)
            made.append((name, p))
        if g["algorithm"] == "cosmos":
            matrices.extend(made)
        else:
            rest_groups.append({"params": [p for _, p in made], "weight_decay": g.get("weight_decay", 0.1), "name": g["name"]})
    return matrices, rest_groups


# ---------------------------------------------------------------------- candidates
def _parts(opt: str, mats: list[nn.Parameter], rest: list[dict[str, Any]], rank: int, interval: int, lr: float) -> dict[str, tuple[Callable[[], torch.optim.Optimizer], int]]:
    """``{part name: (optimizer factory, refresh period)}`` needed by candidate ``opt``."""
    if opt == "adamw":
        return {"adamw@mat": (lambda: torch.optim.AdamW(mats, lr=lr, weight_decay=0.1), 1),
                "adamw@rest": (lambda: torch.optim.AdamW([dict(g) for g in rest], lr=lr), 1)}
    if opt == "muon":
        return {"muon@mat": (lambda: torch.optim.Muon(mats, lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), 1),
                "adamw@rest": (lambda: torch.optim.AdamW([dict(g) for g in rest], lr=lr), 1)}
    if opt in ("cosmos", "cosmos_ui"):
        ui = 1 if opt == "cosmos" else interval
        return {f"cosmos_ui{ui}@mat": (lambda: COSMOS([{"params": mats, "algorithm": "cosmos"}], lr=lr, rank=rank, update_interval=ui), ui),
                "cosmos@rest": (lambda: COSMOS([dict(g, algorithm="adamw") for g in rest], lr=lr), 1)}
    if opt == "soap":
        from pytorch_optimizer import SOAP

        return {"soap@mat": (lambda: SOAP(mats, lr=lr, precondition_frequency=SOAP_FREQUENCY), SOAP_FREQUENCY),
                "adamw@rest": (lambda: torch.optim.AdamW([dict(g) for g in rest], lr=lr), 1)}
    if opt == "galore":
        from pytorch_optimizer import GaLore

        group = {"params": mats, "rank": rank, "update_proj_gap": GALORE_GAP, "scale": 0.25, "projection_type": "std"}
        return {"galore@mat": (lambda: GaLore([group], lr=lr), 1),
                "adamw@rest": (lambda: torch.optim.AdamW([dict(g) for g in rest], lr=lr), 1)}
    raise ValueError(f"unknown optimizer {opt!r}; choose from {OPTIMIZERS}")


def _label(opt: str, interval: int) -> str:
    return {"adamw": "AdamW", "muon": "Muon", "cosmos": "COSMOS (ui=1)", "cosmos_ui": f"COSMOS (ui={interval})",
            "soap": f"SOAP (freq {SOAP_FREQUENCY})", "galore": f"GaLore (gap {GALORE_GAP})"}[opt]


def _formula_bytes(opt: str, mats: list[nn.Parameter], rest: list[dict[str, Any]], rank: int) -> Optional[int]:
    """Formula state bytes (float32, no step counters) of candidate ``opt``."""
    key = {"adamw": "adamw", "muon": "muon", "cosmos": "cosmos", "cosmos_ui": "cosmos", "soap": "soap"}.get(opt)
    if opt == "galore":
        # GaLore ("std" projection) projects on the smaller side: G V_r^T (m x r) if m >= n,
        # else U_r^T G (r x n). Adam moments of that + the projector (r x min(m, n)).
        total = 0
        for p in mats:
            m, n = p.shape
            r = min(rank, m, n)
            total += 2 * r * max(m, n) + r * min(m, n)
        return 4 * (total + sum(2 * p.numel() for g in rest for p in g["params"]))
    if key is None:
        return None
    groups = [{"algorithm": "cosmos", "params": mats}] + [dict(g, algorithm="adamw") for g in rest]
    return memory_report(groups, rank=rank)[key]


Parts = dict[str, tuple[Callable[[], torch.optim.Optimizer], int]]


def bench_model(model: str, args: argparse.Namespace, optimizers: list[str], notes: list[str]) -> dict[str, Any]:
    """Time and measure every candidate on ``model``'s shapes: build the parameters, time the parts
    interleaved, then one row per candidate and the whole model's formula ratios."""
    config = Config.from_name(model) if args.full else Config.from_name(model, n_layer=1)
    mats_named, rest = build_parameters(config, seed=args.seed, device=args.device)
    mats = [p for _, p in mats_named]
    parts: Parts = {}
    cand_parts: dict[str, list[str]] = {}
    for opt in optimizers:
        ps = _parts(opt, mats, rest, args.rank, args.update_interval, args.lr)
        parts.update(ps)
        cand_parts[opt] = list(ps)
    optims = {name: factory() for name, (factory, _) in parts.items()}
    cands = _time_parts(optims, parts, args, model)
    mat_part = {opt: next(p for p in cand_parts[opt] if p.endswith("@mat")) for opt in optimizers}
    rows = _rows(optimizers, cand_parts, mat_part, cands, optims, mats, rest, args)
    with torch.device("meta"):  # formula ratios of the whole model, whatever was benchmarked
        full = memory_report(cosmos_param_groups(GPT(Config.from_name(model))), rank=args.rank)
    result = {
        "model": model,
        "scope": "full model" if args.full else "one block + embeddings + head",
        "config": config.to_dict(),
        "matrices": [{"name": n, "shape": list(p.shape)} for n, p in mats_named],
        "numel_matrices": sum(p.numel() for p in mats),
        "numel_rest": sum(p.numel() for g in rest for p in g["params"]),
        "rows": rows,
        "formula_full_model_bytes": full,
        "formula_full_model_vs_adamw": {k: v / full["adamw"] for k, v in full.items()},
    }
    if args.profile:
        result["profile"] = _profile(optims, mat_part, args)
    return result


def _time_parts(optims: dict[str, torch.optim.Optimizer], parts: Parts, args: argparse.Namespace,
                desc: str) -> dict[str, common.Candidate]:
    """Every part's first step, warm-up, then ``--repeats`` interleaved rounds."""
    timer = common.InterleavedTimer(
        [common.Candidate(name, optims[name].step, period=parts[name][1], sync=common.device_sync(args.device))
         for name in parts],
        block=args.block, warmup_steps=args.warmup, show_progress=not args.no_progress, desc=desc,
    )
    timer.warmup()
    timer.run(args.repeats)
    return timer.by_name()


def _rows(optimizers: list[str], cand_parts: dict[str, list[str]], mat_part: dict[str, str],
          cands: dict[str, common.Candidate], optims: dict[str, torch.optim.Optimizer], mats: list[nn.Parameter],
          rest: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per candidate: its parts' times summed round by round, ratios to AdamW and Muon
    in the same rounds, measured and formula state bytes."""
    def rounds(opt: str) -> list[float]:
        return [sum(vals) for vals in zip(*(cands[p].rounds for p in cand_parts[opt]))]

    base = {b: rounds(b) for b in ("adamw", "muon") if b in optimizers}
    rows = []
    for opt in optimizers:
        tot, mat = rounds(opt), cands[mat_part[opt]].rounds
        measured = sum(common.state_bytes(optims[p]) for p in cand_parts[opt])
        formula = _formula_bytes(opt, mats, rest, args.rank)
        row: dict[str, Any] = {
            "optimizer": opt,
            "label": _label(opt, args.update_interval),
            "parts": cand_parts[opt],
            "step_s": common.median(tot),
            "step_s_rounds": tot,
            "matrix_step_s": common.median(mat),
            "first_step_s": sum(cands[p].first_step_s for p in cand_parts[opt]),
            "matrix_first_step_s": cands[mat_part[opt]].first_step_s,
            "state_bytes": measured,
            "state_bytes_formula": formula,
        }
        for b, b_rounds in base.items():
            row[f"vs_{b}"] = common.ratio_median(tot, b_rounds)
            row[f"matrix_vs_{b}"] = common.ratio_median(mat, cands[mat_part[b]].rounds)
        if opt in ("cosmos", "cosmos_ui"):
            own = sum(optimizer_state_bytes(optims[p], include_step=False) for p in cand_parts[opt])
            row["state_bytes_lit_cosmos"] = own
            row["state_equals_formula"] = bool(measured == formula == own)
            row.update(_refresh_split(cands[mat_part[opt]], 1 if opt == "cosmos" else args.update_interval))
        rows.append(row)
    adamw_bytes = next((r["state_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["state_vs_adamw"] = r["state_bytes"] / adamw_bytes if adamw_bytes else None
    return rows


def _refresh_split(cand: common.Candidate, ui: int) -> dict[str, float]:
    """Median step seconds on refresh steps (every ``ui``-th) and on the others, when ``ui > 1``."""
    if ui <= 1:
        return {}
    return {"matrix_refresh_step_s": common.median([s for t, s in cand.samples if t % ui == 0]),
            "matrix_plain_step_s": common.median([s for t, s in cand.samples if t % ui != 0])}


def _profile(optims: dict[str, torch.optim.Optimizer], mat_part: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler op tables (self CPU time; overall and by input shape) and cProfile top
    functions of the matrix parts of COSMOS and Muon and of the two AdamW implementations on the
    rest, over ``--profile-steps`` steps each."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    targets = {opt: mat_part[opt] for opt in ("cosmos", "cosmos_ui", "muon") if opt in mat_part}
    # The AdamW parts on the rest: COSMOS's own AdamW groups against torch.optim.AdamW.
    targets.update({p: p for p in ("cosmos@rest", "adamw@rest") if p in optims})
    for opt, part in targets.items():
        o = optims[part]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.profile_steps):
                o.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.profile_steps):
            o.step()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        out[opt] = {
            "steps": args.profile_steps,
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top],
            "op_table": table,
            "op_table_by_shape": by_shape,
            "cprofile": s.getvalue(),
        }
    return out


# ---------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# optimizer_step: time per step() and optimizer-state memory", "", common.machine_markdown(result["machine"]), ""]
    s = result["settings"]
    lines.append(
        f"Settings: rank {s['rank']}, COSMOS update_interval 1 and {s['update_interval']}, ns_dtype bfloat16 "
        f"(COSMOS) / bf16 (torch Muon), {s['repeats']} interleaved rounds, block {s['block']} steps, "
        f"warm-up {s['warmup']} steps; times are medians over rounds, ratios are per-round medians."
    )
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    for res in result["models"]:
        lines += ["", f"## {res['model']} ({res['scope']}: {res['numel_matrices'] / 1e6:.2f}M matrix + "
                      f"{res['numel_rest'] / 1e6:.2f}M other parameters)", ""]
        headers = ["optimizer", "step ms", "vs AdamW", "vs Muon", "matrices ms", "matrices vs AdamW", "matrices vs Muon",
                   "first step ms", "state MiB", "state vs AdamW", "formula MiB"]
        rows = []
        for r in res["rows"]:
            rows.append([r["label"], 1e3 * r["step_s"], r.get("vs_adamw"), r.get("vs_muon"), 1e3 * r["matrix_step_s"],
                         r.get("matrix_vs_adamw"), r.get("matrix_vs_muon"), 1e3 * r["first_step_s"],
                         r["state_bytes"] / MiB, r["state_vs_adamw"],
                         None if r["state_bytes_formula"] is None else r["state_bytes_formula"] / MiB])
        lines.append(common.markdown_table(headers, rows))
        for r in res["rows"]:
            if "state_equals_formula" in r:
                lines.append(f"\n{r['label']}: measured state {r['state_bytes']} B, formula {r['state_bytes_formula']} B, "
                             f"lit_cosmos.optimizer_state_bytes {r['state_bytes_lit_cosmos']} B -> "
                             f"{'equal' if r['state_equals_formula'] else 'MISMATCH'}.")
            if "matrix_refresh_step_s" in r:
                lines.append(f"{r['label']} matrices: refresh step {1e3 * r['matrix_refresh_step_s']:.1f} ms, "
                             f"other steps {1e3 * r['matrix_plain_step_s']:.1f} ms (medians).")
        by = {r["optimizer"]: r for r in res["rows"]}
        if "muon" in by:
            for opt in ("cosmos", "cosmos_ui"):
                if opt in by:
                    r = by[opt]
                    met = r["matrix_vs_muon"] <= TARGET_VS_MUON and r["vs_muon"] <= TARGET_VS_MUON
                    lines.append(f"Target (COSMOS step <= {TARGET_VS_MUON}x torch Muon), {r['label']}: matrices "
                                 f"{r['matrix_vs_muon']:.2f}x, with the rest {r['vs_muon']:.2f}x -> {'met' if met else 'MISSED'}.")
        f = res["formula_full_model_vs_adamw"]
        lines.append(f"\nFormula state of the whole {res['model']} (embeddings/head/norms on AdamW) relative to AdamW: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in f.items()) + ".")
    return "\n".join(lines)


def plot(result: dict[str, Any]):
    plt = common.pyplot()
    if plt is None:
        return None
    models = [r["model"] for r in result["models"]]
    labels = [r["label"] for r in result["models"][0]["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / max(len(labels), 1)
    for ax, key, title in ((axes[0], "vs_adamw", "step time / AdamW (whole candidate)"),
                           (axes[1], "matrix_vs_muon", "matrix step time / Muon"),
                           (axes[2], "state_vs_adamw", "state bytes / AdamW")):
        for i, lab in enumerate(labels):
            vals = [next((r.get(key) or float("nan")) for r in m["rows"] if r["label"] == lab) for m in result["models"]]
            ax.bar([j + i * width for j in range(len(models))], vals, width, label=lab)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"optimizer_step ({result['models'][0]['scope']}; {result['machine']['cpu']}, "
                 f"threads={result['machine']['torch_threads']})", fontsize=9)
    return fig


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    p.add_argument("--models", nargs="+", default=None, help=f"zoo config names (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--full", action="store_true", help="every block of the model instead of one")
    p.add_argument("--optimizers", nargs="+", default=None, choices=OPTIMIZERS,
                   help="candidates (default: all; soap/galore need pytorch-optimizer)")
    p.add_argument("--rank", type=int, default=None, help="COSMOS and GaLore rank (default 64; 16 with --quick)")
    p.add_argument("--update-interval", type=int, default=4, help="update_interval of the second COSMOS candidate")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--block", type=int, default=2, help="steps per candidate per round (rounded up to its period)")
    p.add_argument("--profile", action="store_true", help="also profile COSMOS and Muon (torch.profiler + cProfile)")
    p.add_argument("--profile-steps", type=int, default=4)
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict."""
    return common.run_benchmark(build_parser, NAME, _run, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    _resolve(args)
    optimizers, notes = _select_optimizers(args.optimizers)
    machine = common.machine_info(args.device, [NAME, *argv])
    common.warm_kernels()
    models = []
    for model in common.progress(args.models, len(args.models), "models", not args.no_progress):
        models.append(bench_model(model, args, optimizers, notes))
    result = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "optimizers": optimizers,
        "notes": notes,
        "models": models,
    }
    md = to_markdown(result)
    if args.profile:
        for res in models:
            for opt, prof in res.get("profile", {}).items():
                md += f"\n\n### Profile of {opt}, {res['model']} ({prof['steps']} steps)\n\n```\n{prof['op_table']}\n```"
    return common.publish(args.out, result, md, plot(result))


def _resolve(args: argparse.Namespace) -> None:
    """Validate the command line and fill in the defaults (full run or ``--quick``)."""
    if args.update_interval < 2:
        raise SystemExit(f"--update-interval must be >= 2 (ui=1 is always measured), got {args.update_interval}")
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    unknown = [m for m in args.models if m not in Config.available()]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; available: {', '.join(Config.available())}")
    if (args.rank is not None and args.rank < 0) or args.block < 1 or args.profile_steps < 1:
        raise SystemExit("--rank must be >= 0, --block and --profile-steps >= 1")
    if args.rank is None:
        args.rank = 16 if args.quick else 64
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quick:
        args.block = 1


def _select_optimizers(requested: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """The candidates to run, baselines first, and notes on what was left out and why."""
    notes: list[str] = []
    optimizers = list(requested or OPTIMIZERS)
    if not _have_pytorch_optimizer():
        skipped = [o for o in optimizers if o in ("soap", "galore")]
        if skipped:
            notes.append(f"skipped {', '.join(skipped)}: pytorch-optimizer is not installed "
                         "(pip install 'lit-cosmos[bench]')")
        optimizers = [o for o in optimizers if o not in ("soap", "galore")]
    optimizers = [o for o in OPTIMIZERS if o in optimizers]  # fixed order: baselines first
    if "galore" in optimizers:
        notes.append(f"GaLore refreshes its projector (an SVD) every {GALORE_GAP} steps: its step time is the steady "
                     "state between refreshes; its first step includes one SVD refresh.")
    notes.append("Muon = torch.optim.Muon on the matrices + torch.optim.AdamW (default, non-fused) on the rest; "
                 "COSMOS runs the rest with its own AdamW groups; SOAP/GaLore use torch.optim.AdamW for the rest.")
    return optimizers, notes


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
