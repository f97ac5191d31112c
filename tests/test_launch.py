"""zoo.launch: the process launcher of the distributed tests and benchmarks."""

import socket
import tempfile

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo import launch

pytestmark = pytest.mark.distributed


def _ok_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with open(out, "a") as f:
        f.write(f"{rank}:{port}\n")
    dist.destroy_process_group()


def _failing_worker(rank, world, port):
    raise RuntimeError(f"rank {rank} of {world} failed on purpose")


def test_a_taken_port_is_retried_on_a_new_one(tmp_path, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = iter([taken, launch.free_port()])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports))
        out = tmp_path / "ranks.txt"
        launch.spawn(_ok_worker, 1, str(out))
    rank, port = out.read_text().split(":")
    assert rank == "0" and int(port) != taken  # the first launch failed to bind, the second ran


def test_a_failing_worker_fails_the_launch_with_its_message(monkeypatch, tmp_path):
    # torch writes a failed worker's traceback to tempfile's folder and never removes it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = []
    real = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: calls.append(1) or real())
    with pytest.raises(mp.ProcessRaisedException, match="rank 0 of 1 failed on purpose"):
        launch.spawn(_failing_worker, 1)
    assert len(calls) == 1  # not a port problem: no retry
    assert list(tmp_path.iterdir()) == []  # no pytorch-errorfile-*.pickle left behind
    assert tempfile.tempdir == str(tmp_path)
