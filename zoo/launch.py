"""Run a function on N local processes with a fresh TCP rendezvous (tests and benchmarks, CPU/gloo)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    on a new port, up to ``attempts`` times. Leaves no files behind (see :func:`_private_tempdir`).
    """
    for attempt in range(1, attempts + 1):
        try:
            with _private_tempdir():
                mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            if attempt == attempts or not _port_taken(err):
                raise


@contextmanager
def _private_tempdir() -> Iterator[None]:
    """Point ``tempfile`` at a folder removed afterwards: ``torch.multiprocessing.spawn`` writes
    each failed worker's traceback to a ``pytorch-errorfile-*.pickle`` there and never deletes it
    (where the default temp folder is unusable, ``tempfile`` falls back to the working directory)."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="lit-cosmos-spawn-") as folder:
        tempfile.tempdir = folder
        try:
            yield
        finally:
            tempfile.tempdir = saved
