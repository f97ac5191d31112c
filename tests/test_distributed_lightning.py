"""The zoo's DDP and FSDP2 configs through ``lit-cosmos fit`` with 2 CPU processes (gloo).

Each case trains the debug model 6 steps without stopping, and 3 steps then 3 more resumed from
the checkpoint, with the eigenbasis refreshed by the ``EigenbasisRefresh`` callback on steps 2, 4
and 6; the resumed run must end with exactly the same parameters and optimizer state.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STRATEGIES = {
    "ddp": ["--config", str(ROOT / "configs/strategy/ddp.yaml")],
    "ddp_split": ["--config", str(ROOT / "configs/strategy/ddp.yaml"), "--model.init_args.optimizer", "lit_cosmos.COSMOS",
                  "--model.init_args.optimizer.comm", "ddp_split", "--model.init_args.optimizer.rank", "8"],
    # The overlay follows --trainer.devices: no data_parallel_size to keep in step with it.
    "fsdp2_dcp": ["--config", str(ROOT / "configs/strategy/fsdp2.yaml")],
    "fsdp2_full": ["--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
                   "--trainer.strategy.init_args.save_distributed_checkpoint", "false"],
}


def _fit(workdir: Path, name: str, extra: list[str], max_steps: int, ckpt: Path | None = None) -> Path:
    args = [
        sys.executable, "-m", "zoo.cli", "fit", "--config", str(ROOT / "configs/debug.yaml"), *extra,
        "--trainer.devices", "2", "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(workdir / "runs"), "--trainer.logger.init_args.name", name,
        "--data.init_args.cache_dir", str(workdir / "data"),
        # a constant rate: the warmup-cosine schedule's length is max_steps, which the stopped run changes
        "--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.ConstantLR",
        "--model.init_args.lr_scheduler.factor", "1.0",
        # refreshes on steps 2, 4, 6 only: a resume that miscounted steps would refresh elsewhere
        "--trainer.callbacks+=lit_cosmos.callbacks.EigenbasisRefresh", "--trainer.callbacks.interval", "2",
    ]
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    versions = sorted((workdir / "runs" / name).iterdir(), key=lambda p: int(p.name.split("_")[-1]))
    return versions[-1] / "checkpoints" / "last.ckpt"


def _load(ckpt: Path, tmp: Path) -> dict:
    if ckpt.is_dir():  # a distributed (DCP) checkpoint: convert it into one file to read it here
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = tmp / (ckpt.parent.parent.parent.name + ".pt")
        dcp_to_torch_save(ckpt.resolve(), out)
        state = torch.load(out, map_location="cpu", weights_only=False)
        meta = torch.load(ckpt.resolve() / "meta.pt", map_location="cpu", weights_only=False)
        return {**meta, "state_dict": state["state_dict"], "optimizer_states": [state["optimizer_0"]]}
    return torch.load(ckpt.resolve(), map_location="cpu", weights_only=False)


def _flatten(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}/{i}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_resume_equals_uninterrupted(tmp_path, strategy):
    extra = STRATEGIES[strategy]
    straight = _fit(tmp_path, "straight", extra, 6)
    first = _fit(tmp_path, "first", extra, 3)
    resumed = _fit(tmp_path, "resumed", extra, 6, ckpt=first)
    a, b = _load(straight, tmp_path), _load(resumed, tmp_path)
    assert a["global_step"] == b["global_step"] == 6
    model_a, model_b = dict(_flatten(a["state_dict"])), dict(_flatten(b["state_dict"]))
    assert model_a.keys() == model_b.keys() and len(model_a) > 5
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    opt_a, opt_b = dict(_flatten(a["optimizer_states"])), dict(_flatten(b["optimizer_states"]))
    assert opt_a.keys() == opt_b.keys()
    assert any(k.endswith("/U") for k in opt_a) and any(k.endswith("/exp_avg") for k in opt_a)
    for k in opt_a:
        assert torch.equal(opt_a[k], opt_b[k]), k
    refresh_a = [v for k, v in a["callbacks"].items() if "EigenbasisRefresh" in k]
    refresh_b = [v for k, v in b["callbacks"].items() if "EigenbasisRefresh" in k]
    assert refresh_a == refresh_b and refresh_a[0]["step"] == 6 and refresh_a[0]["refreshes"] == 3
