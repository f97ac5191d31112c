"""Resume is exact under every strategy: a run interrupted mid-way and resumed by a fresh Trainer
ends with the same bits as the uninterrupted run (2 CPU processes, gloo, through Lightning).

Models: a user-style LightningModule around ``transformers``' ``LlamaForCausalLM`` (random
weights from a ``LlamaConfig``, ``CosmosMixin``, ``fully_shard`` per decoder layer and then the
root in ``configure_model``) and the zoo's ``CausalLM``. Strategies: DDP, DDP work split
(``comm="ddp_split"``), FSDP2 (``ModelParallelStrategy``) with its distributed checkpoint and with
a full-state file; each with and without ``EigenbasisRefresh``. Every case trains ``STEPS``
steps without stopping, and ``STOP`` steps (same ``max_steps``, stopped by a callback after the
checkpoint) then the rest resumed from that checkpoint. Compared bitwise, per rank: parameters,
optimizer state (values, dtypes, strides), param-group values and their types, the LR scheduler
and the refresh callback, both after loading (against the interrupted run at ``STOP``) and at the
end. The replicated state (FSDP2: ``U`` and ``S``; DDP: everything) must also be bitwise equal
across ranks, because a checkpoint keeps one copy of it.

Rank-dependent kernels: the QR of the basis refresh runs on every rank, and its last bits depend
on each rank's kernels (MKL's change with the thread count, and Lightning's ModelParallelStrategy
launcher leaves rank 0 on 1 thread and the others on the default). To test that COSMOS never
relies on ranks rounding alike, rank 1 computes its QR in float64 under DDP work split and FSDP2
(plain DDP computes every update on every rank by design: there, equal kernels are a premise).

Resharding: two of the FSDP2 checkpoints are then resumed by one process (rank 0 alone, in a
fresh 1-process group): the loaded state must be the saved one bit for bit, and the continued run
must stay within float rounding of the 2-process one.

All 2-process cases share one spawned process group (Lightning joins it); mismatches are
collected as data, so each case reports its own.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from zoo.launch import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# With the callback, refreshes on steps 2 and 4: one before the stop, one after the resume (step 3
# is a plain step); without it COSMOS refreshes on every step after the first.
STEPS, STOP = 4, 2
GLOBAL_BATCH, SEQ = 4, 16  # rows per optimizer step over all ranks
MODELS = ("hf_llama", "zoo")
STRATEGIES = ("ddp", "ddp_split", "fsdp2_dcp", "fsdp2_full")
CASES = [f"{m}-{s}-{'refresh' if r else 'plain'}" for m in MODELS for s in STRATEGIES for r in (False, True)]
ONE_PROCESS_CASES = ("hf_llama-fsdp2_dcp-refresh", "zoo-fsdp2_full-plain")


@pytest.fixture(autouse=True)
def _restore_env():
    """Lightning writes MASTER_PORT and friends into os.environ: leave it as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------- models
def _tokens(module: Any, vocab: int) -> torch.Tensor:
    """This rank's rows of the global batch of the current optimizer step: a function of the step
    only, so the data replays exactly on resume and on any number of processes."""
    g = torch.Generator().manual_seed(1000 + module.trainer.global_step)
    batch = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return batch.chunk(module.trainer.world_size)[module.global_rank]


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(range(10_000), batch_size=1)  # batches come from _tokens


def split_cosmos(params: Any) -> torch.optim.Optimizer:
    """COSMOS with the matrix work split over the DDP ranks (module level: checkpoints name it)."""
    from lit_cosmos import COSMOS

    return COSMOS(params, comm="ddp_split")


def _make_hf_llama(split: bool) -> Any:
    import lightning as L
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_cosmos import CosmosConfig, CosmosMixin

    class HFLlama(CosmosMixin, L.LightningModule):
        """What a user writes: an existing model, CosmosMixin, FSDP2 sharding in configure_model."""

        # r < n for every matrix (the Newton-Schulz path), same-shape matrices stacked as on GPUs;
        # the zoo model runs the unstacked CPU default with r = n for most matrices.
        cosmos_config = CosmosConfig(rank=16, optimizer_kwargs={"batch": True})

        def __init__(self) -> None:
            super().__init__()
            config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
            torch.manual_seed(0)
            self.net = LlamaForCausalLM(config)
            self.optimizer = split_cosmos if split else None
            self._sharded = False

        def configure_model(self) -> None:
            if self.device_mesh is None or self._sharded:
                return
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
            self._sharded = True

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = _tokens(self, self.net.config.vocab_size)
            logits = self.net(input_ids=x[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return _loader()

    return HFLlama()


def _make_zoo(split: bool) -> Any:
    from zoo.lit_model import CausalLM, cosmos_optimizer

    class ZooLM(CausalLM):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(_tokens(self, self.config.vocab_size), batch_idx)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return _loader()

    torch.manual_seed(0)
    return ZooLM("debug", optimizer=split_cosmos if split else cosmos_optimizer)


def _module(model: str, strategy: str) -> Any:
    return (_make_hf_llama if model == "hf_llama" else _make_zoo)(strategy == "ddp_split")


def _strategy(strategy: str, world: int) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    if strategy.startswith("ddp"):
        return DDPStrategy()
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                 save_distributed_checkpoint=strategy == "fsdp2_dcp")


# ---------------------------------------------------------------------------- snapshots
def _snapshot(trainer: Any, module: Any) -> dict[str, Any]:
    """This rank's bits: parameters and optimizer state (local shards), param groups, LR scheduler
    and refresh-callback state."""
    from lit_cosmos.distributed import local_tensor

    opt = trainer.optimizers[0]
    names = {p: n for n, p in module.named_parameters()}
    state = {}
    for p, st in opt.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                local = local_tensor(value)
                state[f"{names[p]}/{key}"] = (local.detach().clone(), str(local.dtype), tuple(local.stride()),
                                              type(value).__name__)
    refresh = [cb.state_dict() for cb in trainer.callbacks if type(cb).__name__ == "EigenbasisRefresh"]
    return {
        "step": trainer.global_step,
        "params": {n: local_tensor(p.detach()).clone() for n, p in module.named_parameters()},
        "state": state,
        "groups": [{k: (v, type(v).__name__) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "scheduler": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "refresh": refresh,
    }


def _differences(a: dict[str, Any], b: dict[str, Any], what: str) -> list[str]:
    out = []
    if a["step"] != b["step"]:
        out.append(f"{what}: global_step {a['step']} != {b['step']}")
    for kind in ("params", "state"):
        if a[kind].keys() != b[kind].keys():
            out.append(f"{what}: {kind} keys differ: {sorted(a[kind].keys() ^ b[kind].keys())[:4]}")
        for key in a[kind].keys() & b[kind].keys():
            x, y = a[kind][key], b[kind][key]
            tx, ty = (x[0], y[0]) if kind == "state" else (x, y)
            if kind == "state" and x[1:] != y[1:]:
                out.append(f"{what}: {key} dtype/stride/type {x[1:]} != {y[1:]}")
            elif not torch.equal(tx, ty):
                rel = ((tx.double() - ty.double()).norm() / tx.double().norm().clamp_min(1e-30)).item()
                out.append(f"{what}: {kind} {key} differs (relative {rel:.1e})")
    if len(a["groups"]) != len(b["groups"]):
        out.append(f"{what}: {len(a['groups'])} != {len(b['groups'])} param groups")
    for i, (ga, gb) in enumerate(zip(a["groups"], b["groups"])):
        for key in sorted(ga.keys() | gb.keys()):
            if ga.get(key) != gb.get(key):  # (value, type name) pairs
                out.append(f"{what}: param group {i} {key}: {ga.get(key)} != {gb.get(key)}")
    for name in ("scheduler", "refresh"):
        if a[name] != b[name]:
            out.append(f"{what}: {name} {a[name]} != {b[name]}")
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _replicated_differences(snap: dict[str, Any], strategy: str, what: str) -> list[str]:
    """Tensors every rank must hold bitwise alike (a checkpoint saves one copy of them)."""
    if strategy.startswith("fsdp2"):
        items = {k: v[0] for k, v in snap["state"].items() if k.endswith(("/U", "/S", "/step"))}
    elif strategy == "ddp_split":  # state lives on each matrix's owner; parameters are shared
        items = dict(snap["params"])
    else:
        items = {**snap["params"], **{k: v[0] for k, v in snap["state"].items()}}
    mine = {k: _digest(v) for k, v in items.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [f"{what}: {k} differs across ranks" for k in sorted(mine) if any(o.get(k) != mine[k] for o in every)]


# ---------------------------------------------------------------------------- Lightning runs
def _callbacks(refresh: bool) -> list[Any]:
    from lit_cosmos.callbacks import EigenbasisRefresh

    return [EigenbasisRefresh(interval=2)] if refresh else []


def _fit(model: str, strategy: str, refresh: bool, world: int, *, stop_at: int | None = None,
         ckpt_dir: str | None = None, ckpt_path: str | None = None) -> dict[str, Any]:
    """One Lightning fit; returns snapshots: "end", "stop" (at ``stop_at``), "loaded" (resumes)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    snaps: dict[str, Any] = {}

    class Probe(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if ckpt_path is not None:
                snaps["loaded"] = _snapshot(trainer, pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == stop_at:
                snaps["stop"] = _snapshot(trainer, pl_module)
                trainer.should_stop = True  # the checkpoint callback still saves this step

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            snaps["end"] = _snapshot(trainer, pl_module)

    callbacks = [*_callbacks(refresh), Probe()]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=stop_at,
                                         save_top_k=-1))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=_strategy(strategy, world), max_steps=STEPS,
        callbacks=callbacks, logger=False, enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(_module(model, strategy), ckpt_path=ckpt_path, weights_only=False)
    return snaps


def _join(rank: int, world: int, port: int) -> None:
    """Start the process group that Lightning then joins (as under torchrun)."""
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), NODE_RANK="0")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the routing table, device lines
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _qr_in_float64(A: torch.Tensor, mode: str = "reduced") -> tuple[torch.Tensor, torch.Tensor]:
    """Another valid QR kernel: the same factorisation, rounded differently in the last bits."""
    Q, R = _QR(A.double(), mode=mode)
    return Q.to(A.dtype), R.to(A.dtype)


_QR = torch.linalg.qr


def _allow_module_globals() -> None:
    """The zoo's CausalLM keeps its optimizer function among its hyperparameters. Lightning 2.6
    drops ``Trainer.fit(weights_only=...)`` on strategies that restore after setup
    (ModelParallelStrategy), so torch's weights-only default loads the checkpoint: allow them."""
    from zoo.lit_model import cosmos_optimizer

    torch.serialization.add_safe_globals([cosmos_optimizer, split_cosmos])


def _matrix_worker(rank: int, world: int, port: int, root: str, cases: list[str]) -> None:
    _join(rank, world, port)
    _allow_module_globals()
    A = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(_QR(A)[0], _qr_in_float64(A)[0])  # the injected kernel does differ
    results: dict[str, list[str]] = {}
    saved: dict[str, dict[str, Any]] = {}
    for case in cases:
        model, strategy, kind = case.split("-")
        refresh = kind == "refresh"
        torch.linalg.qr = _qr_in_float64 if rank == 1 and strategy != "ddp" else _QR
        ckpt_dir = os.path.join(root, case)
        straight = _fit(model, strategy, refresh, world)
        first = _fit(model, strategy, refresh, world, stop_at=STOP, ckpt_dir=ckpt_dir)
        resumed = _fit(model, strategy, refresh, world, ckpt_path=os.path.join(ckpt_dir, f"step={STOP}.ckpt"))
        problems = _differences(first["stop"], resumed["loaded"], "after loading")
        problems += _differences(straight["end"], resumed["end"], f"at step {STEPS}")
        for name, snap in (("uninterrupted", straight["end"]), ("resumed", resumed["end"])):
            problems += _replicated_differences(snap, strategy, name)
        if first["stop"]["step"] != STOP or straight["end"]["step"] != STEPS:
            problems.append(f"steps taken: {first['stop']['step']}, {straight['end']['step']}")
        every: list[Any] = [None] * world
        dist.all_gather_object(every, problems)
        results[case] = [f"rank {r}: {p}" for r, ps in enumerate(every) for p in ps]
        if case in ONE_PROCESS_CASES:  # rank 0 resumes these checkpoints alone below
            both: list[Any] = [None] * world
            dist.all_gather_object(both, {"stop": first["stop"], "end": straight["end"]})
            saved[case] = {"stop": [b["stop"] for b in both], "end": [b["end"] for b in both]}
    torch.linalg.qr = _QR
    dist.destroy_process_group()
    if rank == 0:
        # The same processes' rank 0 alone: a 1-process group (a file rendezvous, no port), as a
        # job restarted on fewer processes would be.
        os.environ.update(WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", init_method=f"file://{root}/one_process_rendezvous", rank=0, world_size=1)
        for case in ONE_PROCESS_CASES:
            if case in saved:
                results[f"one_process:{case}"] = _resume_on_one_process(root, case, saved[case])
        dist.destroy_process_group()
        Path(root, "results.json").write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("resume_matrix")
    spawn(_matrix_worker, 2, str(root), CASES)
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_resume_is_bitwise(matrix: tuple[Path, dict[str, list[str]]], case: str) -> None:
    _, results = matrix
    assert results[case] == [], "\n".join(results[case][:20])


# ---------------------------------------------------------------------------- 2 -> 1 process
def _whole(parts: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor from each rank's Shard(0) rows (torch.chunk layout)."""
    return torch.cat(parts)


def _resume_on_one_process(root: str, case: str, saved: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Resume a 2-process FSDP2 checkpoint on 1 process; the differences found, as text."""
    model, strategy, kind = case.split("-")
    got = _fit(model, strategy, kind == "refresh", 1, ckpt_path=os.path.join(root, case, f"step={STOP}.ckpt"))
    loaded, stop, problems = got["loaded"], saved["stop"], []
    # The loaded state is the saved one, bit for bit: the parameters, M, V and the AdamW moments
    # resharded from 2 row blocks into 1, U, S and the step counters (one copy for all ranks) as
    # they were, and the param groups, the LR scheduler and the refresh schedule.
    if loaded["params"].keys() != stop[0]["params"].keys() or loaded["state"].keys() != stop[0]["state"].keys():
        problems.append("parameter or state names differ")
    for key in loaded["params"].keys() & stop[0]["params"].keys():
        if not torch.equal(loaded["params"][key], _whole([s["params"][key] for s in stop])):
            problems.append(f"loaded parameter {key} differs")
    for key in loaded["state"].keys() & stop[0]["state"].keys():
        value, dtype, _, kind_ = loaded["state"][key]
        parts = [s["state"][key] for s in stop]
        sharded = parts[0][3] == "DTensor" and value.ndim > 0
        if (dtype, kind_) != (parts[0][1], parts[0][3]):
            problems.append(f"loaded {key} is a {dtype} {kind_}, saved a {parts[0][1]} {parts[0][3]}")
        elif not torch.equal(value, _whole([p[0] for p in parts]) if sharded else parts[0][0]):
            problems.append(f"loaded {key} differs")
    problems += [p for p in _differences({**stop[0], "params": {}, "state": {}},
                                         {**loaded, "params": {}, "state": {}}, "after loading")]
    # ... and it continues the same trajectory up to float rounding: the sums over 2 row blocks
    # and over the 2 processes' halves of each batch are sums over 1 now.
    for key, value in got["end"]["params"].items():
        want = _whole([e["params"][key] for e in saved["end"]])
        err = (value - want).abs().max().item()
        if not err <= 2e-4:  # a quarter of one step's update (RMS 4e-4 x lr factor)
            problems.append(f"at step {STEPS}: {key} is {err:.1e} away from the 2-process run")
    return problems


def test_fsdp2_checkpoint_resumes_on_one_process(matrix: tuple[Path, dict[str, list[str]]]) -> None:
    _, results = matrix
    for case in ONE_PROCESS_CASES:
        problems = results[f"one_process:{case}"]
        assert problems == [], f"{case}:\n" + "\n".join(problems[:20])
