"""Benchmarks of the optimizers on zoo shapes (CPU or GPU), run as ``python -m zoo.bench NAME``.

- ``optimizer_step``: time per ``step()`` and state bytes of COSMOS, AdamW, Muon, SOAP and GaLore
  on the matrix shapes of the llama configs (:mod:`zoo.bench.optimizer_step`).
- ``scaling``: step time of COSMOS, Muon and SOAP as the rank and the matrix size grow
  (:mod:`zoo.bench.scaling`).
- ``convergence``: validation loss of COSMOS, AdamW, Muon and SOAP after the same token budget on a
  small byte-level LLaMA, each at its swept learning rate, over seeds (:mod:`zoo.bench.convergence`).
- ``refresh``: loss and step time of COSMOS with eigenbasis refreshes every 1, 4, 16 steps and
  on the adaptive schedule (:mod:`zoo.bench.refresh`).
- ``distributed``: optimizer-step time per rank for 1 vs 2 processes: replicated COSMOS, DDP
  work split and FSDP2 row shards (:mod:`zoo.bench.distributed`).
- ``gpu``: the GPU evidence pack, eight minutes on one GPU: optimizer step and memory of COSMOS
  (defaults, bf16 state, fast subspace, compiled) against Muon and fused AdamW on the llama-130m,
  350m and 1b models, and a short llama-60m training run; ``--dry-run`` checks it on a CPU
  (:mod:`zoo.bench.gpu`). It writes to ``docs/benchmarks/gpu/`` by default.

Every benchmark takes ``--quick`` (tiny shapes, seconds), ``--out DIR`` (default
``bench_results/NAME/``) and writes ``results.json``, ``results.md`` and ``results.png`` there.
Timings are ratios to baselines measured in the same process in interleaved rounds; see
:mod:`zoo.bench.common`. Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

#: benchmark name -> module (each has ``run(argv) -> dict`` and ``main(argv)``)
BENCHMARKS = {
    "optimizer_step": "zoo.bench.optimizer_step",
    "scaling": "zoo.bench.scaling",
    "distributed": "zoo.bench.distributed",
    "convergence": "zoo.bench.convergence",
    "refresh": "zoo.bench.refresh",
    "gpu": "zoo.bench.gpu",
}

__all__ = ["BENCHMARKS", "run", "main"]


def _module(name: str) -> Any:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def run(name: str, argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run benchmark ``name`` with command-line arguments ``argv``; returns its result dict."""
    return _module(name).run(argv or [])


def main(argv: Optional[list[str]] = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: python -m zoo.bench {" + ",".join(BENCHMARKS) + "} [--quick] [--out DIR] [options]\n")
        print(__doc__)
        return
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    main_fn: Callable[[list[str]], Any] = _module(name).main
    main_fn(rest)
