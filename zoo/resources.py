"""How many CPU threads and data-loader workers a run takes, from the cores actually free.

PyTorch's default intra-op thread count is the number of cores, whatever else is running. On an
idle machine that is the fastest choice, but next to other CPU jobs OpenMP threads that spin while
waiting compete for the same cores, and a run slows down several times (measured in
``docs/lightning.md#threads``). No fixed setting wins both cases, so ``lit-cosmos`` decides at
start from the cores this process may use (``os.sched_getaffinity``) and the 1-minute load
average, and leaves the decision to the user whenever they made one (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``--data.num_workers``).

The decisions are pure functions of those numbers (:func:`plan_threads`, :func:`plan_workers`),
tested without touching the machine; :func:`usable_cores` and :func:`load_average` read it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

__all__ = ["THREAD_ENV_VARS", "load_average", "plan_threads", "plan_workers", "threads_set_by_user", "usable_cores"]

#: Environment variables through which a user chooses the intra-op thread count.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset`` or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average: runnable processes, ours included; 0.0 where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def free_cores(cores: int, load: float) -> float:
    """Cores not taken by the load, at least 0."""
    return max(0.0, cores - max(0.0, load))


def plan_threads(cores: int, load: float, processes: int = 1) -> int:
    """Intra-op threads per process for ``processes`` training processes on this machine.

    The free cores (``cores - load``), rounded to the nearest whole core, shared evenly by the
    processes; at least 1, at most ``cores // processes``. On an idle 2-core machine this is 2
    (PyTorch's own default, the fastest there), next to a 2-thread job 1.
    """
    if cores < 1 or processes < 1:
        raise ValueError(f"cores={cores} and processes={processes} must be >= 1")
    share = math.floor(free_cores(cores, load) / processes + 0.5)
    return max(1, min(share, max(1, cores // processes)))


def plan_workers(cores: int, load: float, processes: int = 1, on_cpu: bool = True, max_workers: int = 4) -> int:
    """Data-loader worker processes per training process.

    0 when the model trains on CPU: the main process reads ~8M tokens/s, far more than a CPU
    trains on, and a worker would take a core from the model. On an accelerator, the free cores
    per process minus one (the process's own thread), between 0 and ``max_workers``.
    """
    if cores < 1 or processes < 1:
        raise ValueError(f"cores={cores} and processes={processes} must be >= 1")
    if on_cpu:
        return 0
    per_process = math.floor(free_cores(cores, load) / processes)
    return max(0, min(max_workers, per_process - 1))


def threads_set_by_user(environ: Mapping[str, str] | None = None) -> str | None:
    """The environment variable through which the user chose the thread count, if any."""
    environ = os.environ if environ is None else environ
    return next((name for name in THREAD_ENV_VARS if environ.get(name, "").strip()), None)
