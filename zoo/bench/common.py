"""Shared pieces of the benchmarks: interleaved timing, machine info, and result writing.

Timing on a shared machine is noisy, so no benchmark reports a bare wall-clock figure alone:
every candidate is timed in the same process as its baselines, in interleaved rounds (the order
rotates every round, so slow phases of the machine hit every candidate alike), and ratios are
taken round by round before the median is taken. Each round runs a candidate for a *block* of
consecutive steps whose length is a multiple of the candidate's refresh period, so periodic work
(a basis refresh every k steps) is amortised exactly rather than sampled.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

__all__ = [
    "Candidate",
    "InterleavedTimer",
    "add_common_args",
    "apply_common_args",
    "machine_info",
    "markdown_table",
    "median",
    "progress",
    "state_bytes",
    "warm_kernels",
    "write_results",
]

T = TypeVar("T")


# ---------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_sync(device: str) -> Optional[Callable[[], Any]]:
    """What to call around a timed region so that asynchronous device work is included."""
    return torch.cuda.synchronize if str(device).startswith("cuda") else None


def machine_info(device: str = "cpu", argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """What a reader needs to judge a figure: CPU, threads, library versions, the command."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
        "command": "python -m zoo.bench " + " ".join(shlex.quote(str(a)) for a in (sys.argv[1:] if argv is None else argv)),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        info["pytorch_optimizer"] = version("pytorch-optimizer")
    except PackageNotFoundError:
        info["pytorch_optimizer"] = None
    return info


def warm_kernels() -> None:
    """Call every library kernel the optimizers use once, so that the one-off start-up cost of
    LAPACK / oneDNN (hundreds of ms on CPU) is not billed to whichever candidate runs first."""
    a = torch.randn(48, 32)
    torch.linalg.eigh(a.mT @ a)
    torch.linalg.qr(a)
    torch.linalg.svd(a, full_matrices=False)
    b = a.bfloat16()
    _ = b @ b.mT
    torch._foreach_add_([a.clone()], 1.0)


# ---------------------------------------------------------------------- progress
def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """tqdm when it is installed, otherwise a plain line per item on stderr; silent if disabled."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
        return
    for i, item in enumerate(iterable):
        print(f"{desc} {i + 1}/{total if total is not None else '?'}", file=sys.stderr, flush=True)
        yield item


# ---------------------------------------------------------------------- timing
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Candidate:
    """One thing to time: ``step()`` advances it by one step; blocks are ``period`` steps long
    (or a multiple of it), so a refresh every ``period`` steps is counted exactly once per block."""

    name: str
    step: Callable[[], Any]
    period: int = 1
    sync: Optional[Callable[[], Any]] = None  # e.g. torch.cuda.synchronize on a GPU
    steps_taken: int = 0
    first_step_s: float = float("nan")
    # per round: mean seconds per step over the block
    rounds: list[float] = field(default_factory=list)
    # every timed step: (step number after the call, seconds)
    samples: list[tuple[int, float]] = field(default_factory=list)

    def timed_step(self) -> float:
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        self.step()
        if self.sync is not None:
            self.sync()
        dt = time.perf_counter() - t0
        self.steps_taken += 1
        return dt


class InterleavedTimer:
    """Times candidates in rotating, interleaved rounds (ABC, BCA, CAB, ...).

    ``warmup()`` takes each candidate's first step (timed separately: it usually allocates state
    and builds bases) and then ``warmup_steps`` more, untimed. ``run()`` does ``repeats`` rounds;
    in each, every candidate runs one block of ``lcm(period, block)`` steps, each step timed.
    """

    def __init__(self, candidates: Sequence[Candidate], block: int = 1, warmup_steps: int = 1, show_progress: bool = True, desc: str = "") -> None:
        if not candidates:
            raise ValueError("InterleavedTimer needs at least one candidate")
        if block < 1 or warmup_steps < 0:
            raise ValueError(f"block must be >= 1 and warmup_steps >= 0, got {block}, {warmup_steps}")
        self.candidates = list(candidates)
        self.block = block
        self.warmup_steps = warmup_steps
        self.show_progress = show_progress
        self.desc = desc

    def block_len(self, c: Candidate) -> int:
        return math.lcm(max(c.period, 1), self.block)

    def warmup(self) -> None:
        for c in progress(self.candidates, len(self.candidates), f"{self.desc} warm-up", self.show_progress):
            if c.steps_taken == 0:
                c.first_step_s = c.timed_step()
            for _ in range(max(self.warmup_steps, 0)):
                c.timed_step()

    def run(self, repeats: int) -> None:
        n = len(self.candidates)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a timed step would land on one candidate only
        try:
            for r in progress(range(repeats), repeats, f"{self.desc} rounds", self.show_progress):
                order = self.candidates[r % n:] + self.candidates[: r % n]
                if r % 2:
                    order = order[::-1]
                for c in order:
                    times = []
                    for _ in range(self.block_len(c)):
                        dt = c.timed_step()
                        times.append(dt)
                        c.samples.append((c.steps_taken, dt))
                    c.rounds.append(sum(times) / len(times))
        finally:
            if was_enabled:
                gc.enable()

    def by_name(self) -> dict[str, Candidate]:
        return {c.name: c for c in self.candidates}


def ratio_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (both measured in the same round)."""
    return median([a / b for a, b in zip(num, den) if b > 0])


# ---------------------------------------------------------------------- optimizer state
def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        # e.g. pytorch-optimizer's GaLoreProjector keeps its basis as an attribute
        yield from _tensors(vars(obj), depth + 1)


def state_bytes(optimizer: torch.optim.Optimizer, include_step: bool = False) -> int:
    """Bytes of every tensor reachable from ``optimizer.state`` (nested lists, dicts and helper
    objects included, each storage counted once). ``include_step=False`` leaves out entries named
    ``step`` (the scalar counters the memory formulas leave out)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in optimizer.state.values():
        items = st.items() if isinstance(st, dict) else [("", st)]
        for key, value in items:
            if key == "step" and not include_step:
                continue
            for t in _tensors(value):
                ident = (t.untyped_storage().data_ptr(), t.storage_offset())
                if ident in seen:
                    continue
                seen.add(ident)
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return "-" if v is None else str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any]) -> str:
    return (
        f"Command: `{info['command']}`  \n"
        f"Machine: {info['cpu']}, {info['cpu_count']} CPUs, "
        + (f"GPU {info['gpu']}, " if info.get("gpu") else "device cpu, ")
        + f"torch {info['torch']} "
        f"({info['torch_threads']} threads), python {info['python']}, "
        f"pytorch-optimizer {info.get('pytorch_optimizer') or 'not installed'}, "
        f"load average at start {info.get('load_average', '?')}, {info['date_utc']} UTC"
    )


def publish(out: Path, result: dict[str, Any], markdown: str, figure: Any = None) -> dict[str, Any]:
    """Write the results (:func:`write_results`), print the markdown and the written paths, and
    return ``result`` with those paths under ``"paths"``."""
    paths = write_results(out, result, markdown, figure)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    print(markdown)
    print(f"\nwrote {', '.join(str(v) for v in paths.values())}")
    return result


def write_results(out: Path, result: dict[str, Any], markdown: str, figure: Any = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (if a matplotlib figure is given) ``results.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=False, default=_json_default) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    if figure is not None:
        paths["png"] = out / "results.png"
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ---------------------------------------------------------------------- CLI
def new_parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """The parser of ``python -m zoo.bench <name>``, described by the first paragraph of ``doc``,
    with the arguments every benchmark takes."""
    parser = argparse.ArgumentParser(prog=f"python -m zoo.bench {name}", description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, name)
    return parser


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (seconds; for tests)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default bench_results/{name}/)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the (separately timed) first step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice); 1 is steadiest on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of parameters and state (cpu, cuda, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the duration (restored after, so an in-process run, e.g.
    from a test, leaves the caller's setting alone)."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_benchmark(
    build_parser: Callable[[], argparse.ArgumentParser],
    name: str,
    body: Callable[[argparse.Namespace, list[str]], dict[str, Any]],
    argv: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Parse ``argv`` with the benchmark's parser, apply the common arguments, and run
    ``body(args, argv)`` under ``--threads``; returns its result dict."""
    argv = list(argv or [])
    args = build_parser().parse_args(argv)
    apply_common_args(args, name)
    with torch_threads(args.threads):
        return body(args, argv)


def apply_common_args(args: argparse.Namespace, name: str) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    if args.out is None:
        args.out = Path("bench_results") / name
    for key in ("repeats", "warmup"):
        v = getattr(args, key)
        if v is not None and v < (1 if key == "repeats" else 0):
            raise SystemExit(f"--{key} must be >= {1 if key == 'repeats' else 0}, got {v}")
