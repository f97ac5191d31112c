"""Run a function on N local processes with a fresh TCP rendezvous (tests and benchmarks, CPU/gloo)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    fn(rank, world, port, *args)
    # The worker finished and its checks passed. Leave without interpreter finalization: with
    # gloo on CPU, torch's C++ teardown at exit occasionally aborts a worker ("terminate called
    # without an active exception", from a background thread) after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _port_taken(err: BaseException) -> bool:
    text = str(err)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def spawn(fn: Callable[..., Any], world: int, *args: Any, attempts: int = 3) -> None:
    """Call ``fn(rank, world, port, *args)`` on ``world`` spawned processes and wait for them.

    ``fn`` must be importable (module level) and is expected to init and destroy its process group
    on ``tcp://127.0.0.1:port``. A worker that raises fails the call with its traceback. The port
    is free when chosen but may be taken before rank 0 binds it: then the whole launch is retried
    on a new port, up to ``attempts`` times.
    """
    for attempt in range(1, attempts + 1):
        try:
            mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            if attempt == attempts or not _port_taken(err):
                raise
