r"""Optimizer-step time per rank for 1 vs P processes: replicated COSMOS, DDP work split, FSDP2.

Every process holds the matrices of a zoo model (``--model``, ``--blocks`` transformer blocks)
with the same gradients (as DDP gives after its all-reduce) and times, in interleaved rounds:

- ``replicated``: plain COSMOS on whole matrices, what every DDP rank does by default (and what
  one process does alone);
- ``ddp_split``: ``COSMOS(comm="ddp_split")``: each rank computes the matrices it owns, then the
  new values are broadcast from the owners;
- ``fsdp2``: COSMOS on ``Shard(0)`` DTensor row shards (FSDP2's layout): subspace products
  all-reduced, each residual orthogonalised on one owner rank.

A step's time is the slowest rank's (barriers around the step, max over ranks), so it includes
the communication. Ratios are per-round medians against ``replicated`` timed in the same rounds
of the same processes. ``--world 1 2`` runs the whole set with 1 and then 2 processes: the
1-process ``replicated`` time is the single-process baseline, measured in its own run.

With P processes on a machine with C cores, each process should get C / P threads
(``--threads``), or the split runs compete for cores that the replicated run has to itself.

Example::

    python -m zoo.bench distributed --model llama-60m --blocks 2 --world 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lit_cosmos import COSMOS, optimizer_state_bytes
from zoo.bench import common
from zoo.config import Config
from zoo.launch import spawn

NAME = "distributed"
CANDIDATES = ("replicated", "ddp_split", "fsdp2")


def block_shapes(cfg: Config, blocks: int) -> list[tuple[int, int]]:
    """(out, in) shapes of the linear layers of ``blocks`` transformer blocks."""
    d, h, kv = cfg.n_embd, cfg.intermediate_size, cfg.n_embd
    attn = [(d, d), (kv, d), (kv, d), (d, d)]
    mlp = [(h, d), (h, d), (d, h)] if cfg.mlp == "swiglu" else [(h, d), (d, h)]
    return (attn + mlp) * blocks


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    opts = _candidates(world, cfg)
    first, rounds = _time_candidates(opts, cfg)
    state = torch.tensor([float(optimizer_state_bytes(o, include_step=False)) for o in opts.values()],
                         dtype=torch.float64)
    state_max = state.clone()
    dist.all_reduce(state_max, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {
            k: {
                "step_s": common.median(rounds[k]),
                "first_step_s": first[k],
                "vs_replicated": common.ratio_median(rounds[k], rounds["replicated"]),
                "state_bytes_per_rank_max": float(state_max[i]),
            }
            for i, k in enumerate(opts)
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _candidates(world: int, cfg: dict[str, Any]) -> dict[str, COSMOS]:
    """The three COSMOS set-ups over the same weights and gradients (same seed on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(cfg["seed"])
    weights = [0.02 * torch.randn(s, generator=gen) for s in cfg["shapes"]]
    grads = [torch.randn(s, generator=gen) for s in cfg["shapes"]]
    kw = dict(lr=1e-3, rank=cfg["rank"])

    def plain(comm: str) -> COSMOS:
        ps = [nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(ps, grads):
            p.grad = g
        return COSMOS(ps, comm=comm, **kw)

    def sharded() -> COSMOS:
        ps = [nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
        for p, g in zip(ps, grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        return COSMOS(ps, **kw)

    return {"replicated": plain("local"), "ddp_split": plain("ddp_split"), "fsdp2": sharded()}


def _timed_step(opt: COSMOS) -> float:
    """One step between barriers; the slowest rank's seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    opt.step()
    dist.barrier()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_candidates(opts: dict[str, COSMOS], cfg: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """First steps, warm-up, then interleaved rounds of ``block`` steps (who goes first rotates)."""
    first = {k: _timed_step(o) for k, o in opts.items()}
    for _ in range(cfg["warmup"]):
        for o in opts.values():
            _timed_step(o)
    rounds: dict[str, list[float]] = {k: [] for k in opts}
    names = list(opts)
    for i in range(cfg["repeats"]):
        order = names[i % len(names):] + names[: i % len(names)]
        for k in order:
            rounds[k].append(sum(_timed_step(opts[k]) for _ in range(cfg["block"])) / cfg["block"])
    return first, rounds


def build_parser() -> argparse.ArgumentParser:
    p = common.new_parser(NAME, __doc__)
    p.add_argument("--model", default=None, help="zoo config whose block shapes are used (default llama-60m)")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks of matrices (default 2)")
    p.add_argument("--rank", type=int, default=64, help="COSMOS rank")
    p.add_argument("--world", type=int, nargs="+", default=None, help="process counts to run (default 1 2)")
    p.add_argument("--block", type=int, default=2, help="steps per candidate per round")
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = list(argv or [])
    args = build_parser().parse_args(argv)
    common.apply_common_args(args, NAME)
    if args.device != "cpu":
        raise SystemExit("distributed benchmark: only --device cpu (gloo) is wired in here")
    q = args.quick
    cfg = Config.from_name("debug" if q and args.model is None else (args.model or "llama-60m"))
    blocks = args.blocks or (1 if q else 2)
    worlds = args.world or [1, 2]
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(worlds))
    settings = dict(model=cfg.name, blocks=blocks, rank=args.rank, worlds=worlds, threads_per_process=threads,
                    repeats=args.repeats or (2 if q else 5), warmup=args.warmup if args.warmup is not None else (0 if q else 1),
                    block=1 if q else args.block)
    job = dict(shapes=block_shapes(cfg, blocks), seed=args.seed, threads=threads, rank=args.rank,
               repeats=settings["repeats"], warmup=settings["warmup"], block=settings["block"])
    results: dict[str, Any] = {}
    for world in common.progress(worlds, len(worlds), "process counts", not args.no_progress):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            spawn(_worker, world, job, out)
            results[str(world)] = json.loads(Path(out).read_text())
    result = {"name": NAME, "machine": common.machine_info(args.device, ["distributed", *argv]),
              "settings": settings, "shapes": job["shapes"], "results": results}
    return common.publish(args.out, result, to_markdown(result), plot(result))


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# distributed: optimizer step per rank, {s['model']} x {s['blocks']} block(s), rank {s['rank']}", "",
             common.machine_markdown(result["machine"]), "",
             f"{s['threads_per_process']} thread(s) per process; {s['repeats']} interleaved rounds of {s['block']} step(s); "
             "a step is the slowest rank's time between barriers (communication included).", ""]
    base = result["results"].get("1", {}).get("replicated", {}).get("step_s")
    headers = ["processes", "candidate", "step ms", "vs replicated (same run)", "vs 1 process (separate run)", "state MiB per rank"]
    rows = []
    for world, res in result["results"].items():
        for k in CANDIDATES:
            r = res[k]
            rows.append([world, k, 1e3 * r["step_s"], r["vs_replicated"], r["step_s"] / base if base else None,
                         r["state_bytes_per_rank_max"] / 2**20])
    lines.append(common.markdown_table(headers, rows))
    return "\n".join(lines)


def plot(result: dict[str, Any]):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    worlds = list(result["results"])
    for i, k in enumerate(CANDIDATES):
        ax.bar([j + 0.25 * (i - 1) for j in range(len(worlds))], [1e3 * result["results"][w][k]["step_s"] for w in worlds],
               width=0.25, label=k)
    ax.set_xticks(range(len(worlds)), [f"{w} process(es)" for w in worlds])
    ax.set_ylabel("ms per optimizer step (slowest rank)")
    ax.legend()
    ax.set_title(f"{result['settings']['model']} x {result['settings']['blocks']} blocks", fontsize=9)
    return fig


def main(argv: Optional[list[str]] = None) -> None:
    run(argv)
