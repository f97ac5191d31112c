r"""How the step time of COSMOS, Muon and SOAP grows with the rank and with the matrix size.

Two sweeps, each on a single matrix with a random gradient:

1. rank: a ``768 x 2048`` matrix (llama-130m's ``down_proj``, ``m x n`` in the ``nn.Linear``
   layout) with COSMOS rank ``r`` in 0, 16, 32, 64, 128, 256; Muon, SOAP and AdamW do not depend
   on ``r`` and are measured once, in the same rounds.
2. size: square ``n x n`` matrices, n = 256 ... 2048, COSMOS at ``r = 64``.

Expected cost model (flops of one step on an ``m x n`` matrix, ``m <= n``, ``r << m``):

- AdamW: ``O(mn)`` elementwise work, memory-bound.
- Muon: Newton-Schulz, 5 iterations of ``X X^T`` (``m^2 n``), ``A A`` (``m^3``) and ``B X``
  (``m^2 n``): about ``5 (4 m^2 n + 2 m^3)`` flops, in bf16.
- COSMOS: Muon's Newton-Schulz on the residual ``R`` plus ``O(mnr)`` for the subspace work:
  the power-iteration refresh ``G^T (G U)`` (``4mnr``), ``G U'`` again for ``S``
  (``2mnr``), the projection ``X U`` and ``Y U^T`` (``4mnr``), ``A = (Y / sqrt V) U^T``
  (``2mnr``), the projection of ``U`` out of the bf16 NS output (``4mnr``), plus a QR of an
  ``n x r`` matrix (``O(n r^2)``) and ``O(r^3)`` for ``S``. So COSMOS ~ Muon + ``c * mnr`` with
  ``c`` about 16: at ``r = 64`` on ``768 x 2048`` that is ~1.6 GFLOP next to Muon's ~29 GFLOP,
  but in float32, which runs several times slower than bf16 on hardware with bf16 units, and
  as many small, memory-bound kernels; ``r = 0`` is Muon plus bookkeeping.
- SOAP (precondition frequency ``f = 10``): every step rotates the gradient, the first moment
  and the update through both eigenbases (``6 (m^2 n + m n^2)`` flops) and updates both
  Kronecker factors (``2 (m^2 n + m n^2)``); every ``f`` steps a QR of each ``m x m`` and
  ``n x n`` factor (``O(m^3 + n^3)``), the first step an ``eigh`` of each. So ``O(n^3)`` per
  step for square matrices, all in float32: it grows like Muon's ``O(n^3)`` but with a larger
  constant and without bf16.

Example::

    python -m zoo.bench scaling
    python -m zoo.bench scaling --ranks 0 32 64 128 --sizes 256 512 1024 --repeats 3
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch
from torch import nn

from lit_cosmos import COSMOS
from zoo.bench import common

NAME = "scaling"
SOAP_FREQUENCY = 10


def _factories(have_soap: bool, lr: float = 1e-3) -> dict[str, Callable[..., tuple[torch.optim.Optimizer, int]]]:
    """``{name: f(param, rank) -> (optimizer, refresh period)}`` on a single matrix parameter."""
    fs: dict[str, Callable[..., tuple[torch.optim.Optimizer, int]]] = {
        "adamw": lambda p, r: (torch.optim.AdamW([p], lr=lr, weight_decay=0.1), 1),
        "muon": lambda p, r: (torch.optim.Muon([p], lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), 1),
        "cosmos": lambda p, r: (COSMOS([p], lr=lr, rank=r), 1),
    }
    if have_soap:
        from pytorch_optimizer import SOAP

        fs["soap"] = lambda p, r: (SOAP([p], lr=lr, precondition_frequency=SOAP_FREQUENCY), SOAP_FREQUENCY)
    return fs


def _param(m: int, n: int, gen: torch.Generator, device: str) -> nn.Parameter:
    p = nn.Parameter((torch.randn(m, n, generator=gen) * 0.02).to(device))
    p.grad = torch.randn(m, n, generator=gen).to(device)
    return p


def _point(cands: dict[str, tuple[torch.optim.Optimizer, int]], args: argparse.Namespace, desc: str) -> dict[str, dict[str, float]]:
    """Time the candidates interleaved; per candidate: median step seconds, first step seconds,
    and median per-round ratios to Muon and AdamW."""
    sync = common.device_sync(args.device)
    timer = common.InterleavedTimer(
        [common.Candidate(k, o.step, period=per, sync=sync) for k, (o, per) in cands.items()],
        block=args.block, warmup_steps=args.warmup, show_progress=False, desc=desc,
    )
    timer.warmup()
    timer.run(args.repeats)
    c = timer.by_name()
    out = {}
    for k, cand in c.items():
        out[k] = {
            "step_s": common.median(cand.rounds),
            "first_step_s": cand.first_step_s,
            "vs_muon": common.ratio_median(cand.rounds, c["muon"].rounds),
            "vs_adamw": common.ratio_median(cand.rounds, c["adamw"].rounds),
        }
    return out


def rank_sweep(args: argparse.Namespace, fs: dict[str, Callable[..., Any]]) -> list[dict[str, Any]]:
    m, n = args.shape
    gen = torch.Generator().manual_seed(args.seed)
    p = _param(m, n, gen, args.device)
    rows = []
    # Baselines that do not depend on r are rebuilt per point, so every point has its own
    # same-round Muon/AdamW reference.
    for r in common.progress(args.ranks, len(args.ranks), f"rank sweep {m}x{n}", not args.no_progress):
        cands = {"cosmos": fs["cosmos"](p, r)}
        cands.update({k: f(p, r) for k, f in fs.items() if k != "cosmos" and (k != "soap" or r == args.ranks[0])})
        res = _point(cands, args, f"r={r}")
        rows.append({"rank": r, "effective_rank": min(r, m, n), "m": m, "n": n, **{k: v for k, v in res.items()}})
    return rows


def size_sweep(args: argparse.Namespace, fs: dict[str, Callable[..., Any]]) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for size in common.progress(args.sizes, len(args.sizes), f"size sweep r={args.size_rank}", not args.no_progress):
        p = _param(size, size, gen, args.device)
        cands = {k: f(p, args.size_rank) for k, f in fs.items()}
        res = _point(cands, args, f"n={size}")
        rows.append({"n": size, "rank": args.size_rank, **res})
        del p, cands
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = ["# scaling: step time vs rank and vs matrix size", "", common.machine_markdown(result["machine"]), "",
             f"Settings: {s['repeats']} interleaved rounds, block {s['block']} steps (SOAP: {SOAP_FREQUENCY}, its "
             f"refresh period), warm-up {s['warmup']}; COSMOS update_interval 1, ns_dtype bfloat16; medians over rounds, "
             "ratios are per-round medians against Muon/AdamW timed in the same round."]
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    m, n = s["shape"]
    lines += ["", f"## Rank sweep, {m} x {n} matrix", ""]
    headers = ["rank r", "COSMOS ms", "COSMOS / Muon", "COSMOS / AdamW", "Muon ms", "AdamW ms", "COSMOS first step ms"]
    rows = [[r["rank"], 1e3 * r["cosmos"]["step_s"], r["cosmos"]["vs_muon"], r["cosmos"]["vs_adamw"],
             1e3 * r["muon"]["step_s"], 1e3 * r["adamw"]["step_s"], 1e3 * r["cosmos"]["first_step_s"]]
            for r in result["rank_sweep"]]
    lines.append(common.markdown_table(headers, rows))
    soap = next((r["soap"] for r in result["rank_sweep"] if "soap" in r), None)
    if soap:
        lines.append(f"\nSOAP (independent of r) on {m} x {n}: {1e3 * soap['step_s']:.1f} ms/step amortised "
                     f"({soap['vs_muon']:.2f}x Muon), first step {1e3 * soap['first_step_s']:.0f} ms.")
    lines += ["", f"## Size sweep, square n x n, COSMOS r = {s['size_rank']}", ""]
    have_soap = any("soap" in r for r in result["size_sweep"])
    headers = ["n", "COSMOS ms", "Muon ms", "AdamW ms"] + (["SOAP ms"] if have_soap else []) + \
              ["COSMOS / Muon"] + (["SOAP / Muon"] if have_soap else []) + ["COSMOS first step ms"] + \
              (["SOAP first step ms"] if have_soap else [])
    rows = []
    for r in result["size_sweep"]:
        row = [r["n"], 1e3 * r["cosmos"]["step_s"], 1e3 * r["muon"]["step_s"], 1e3 * r["adamw"]["step_s"]]
        if have_soap:
            row.append(1e3 * r["soap"]["step_s"])
        row.append(r["cosmos"]["vs_muon"])
        if have_soap:
            row.append(r["soap"]["vs_muon"])
        row.append(1e3 * r["cosmos"]["first_step_s"])
        if have_soap:
            row.append(1e3 * r["soap"]["first_step_s"])
        rows.append(row)
    lines.append(common.markdown_table(headers, rows))
    return "\n".join(lines)


def plot(result: dict[str, Any]):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rs = result["rank_sweep"]
    ranks = [r["rank"] for r in rs]
    a1.plot(ranks, [1e3 * r["cosmos"]["step_s"] for r in rs], "o-", label="COSMOS")
    a1.plot(ranks, [1e3 * r["muon"]["step_s"] for r in rs], "s--", label="Muon (no rank)")
    a1.plot(ranks, [1e3 * r["adamw"]["step_s"] for r in rs], "^:", label="AdamW (no rank)")
    soap = next((r["soap"] for r in rs if "soap" in r), None)
    if soap:
        a1.axhline(1e3 * soap["step_s"], color="tab:red", ls="-.", label="SOAP (no rank)")
    m, n = result["settings"]["shape"]
    a1.set(xlabel="rank r", ylabel="ms / step", title=f"{m} x {n}: step time vs rank")
    a1.legend(fontsize=8)
    ss = result["size_sweep"]
    ns = [r["n"] for r in ss]
    for key, style, lab in (("cosmos", "o-", f"COSMOS r={result['settings']['size_rank']}"), ("muon", "s--", "Muon"),
                            ("soap", "d-.", f"SOAP (freq {SOAP_FREQUENCY})"), ("adamw", "^:", "AdamW")):
        if all(key in r for r in ss):
            a2.loglog(ns, [1e3 * r[key]["step_s"] for r in ss], style, label=lab, base=2)
    a2.set(xlabel="n (square n x n)", ylabel="ms / step", title="step time vs size")
    a2.legend(fontsize=8)
    fig.suptitle(f"scaling ({result['machine']['cpu']}, threads={result['machine']['torch_threads']}, "
                 f"torch {result['machine']['torch']})", fontsize=9)
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("M", "N"), help="rank-sweep matrix (default 768 2048)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default 0 16 32 64 128 256")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="default 256 512 1024 1536 2048")
    p.add_argument("--size-rank", type=int, default=None, help="COSMOS rank of the size sweep (default 64)")
    p.add_argument("--block", type=int, default=2, help="steps per candidate per round (rounded up to its period)")
    p.add_argument("--no-soap", action="store_true", help="leave SOAP out (it dominates the run time at large n)")
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict."""
    return common.run_benchmark(build_parser, NAME, _run, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    q = args.quick
    args.shape = args.shape or ([48, 96] if q else [768, 2048])
    args.ranks = args.ranks or ([0, 4, 8, 16] if q else [0, 16, 32, 64, 128, 256])
    args.sizes = args.sizes or ([16, 32, 64] if q else [256, 512, 1024, 1536, 2048])
    args.size_rank = args.size_rank if args.size_rank is not None else (8 if q else 64)
    args.repeats = args.repeats or (2 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    if q:
        args.block = 1
    if min(args.ranks) < 0 or args.size_rank < 0 or min(args.sizes) < 1 or min(args.shape) < 1:
        raise SystemExit("ranks must be >= 0, sizes and shape >= 1")
    notes = []
    have_soap = not args.no_soap
    if have_soap:
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            have_soap = False
            notes.append("SOAP skipped: pytorch-optimizer is not installed (pip install 'lit-cosmos[bench]')")
    fs = _factories(have_soap)
    machine = common.machine_info(args.device, [NAME, *argv])
    common.warm_kernels()
    result = {
        "benchmark": NAME,
        "machine": machine,
        "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "notes": notes,
        "rank_sweep": rank_sweep(args, fs),
        "size_sweep": size_sweep(args, fs),
    }
    md = to_markdown(result)
    return common.publish(args.out, result, md, plot(result))


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
