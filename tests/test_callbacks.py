"""Lightning callbacks of lit_cosmos, on a real Trainer (CPU, a few steps), read back from TensorBoard."""

from __future__ import annotations

import json
import math
import os
import signal
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from _numerics import SAFETY, U32, RandomRounding, newton_schulz_twin, single_thread
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cosmos import COSMOS, cosmos_param_groups
from lit_cosmos.callbacks import EigenbasisRefresh, FinalCheckpoint, MemoryMonitor, SubspaceMonitor
from lit_cosmos.lightning.callbacks.memory_monitor import memory_figures
from lit_cosmos.lightning.callbacks.subspace_monitor import ns_polar_error
from lit_cosmos.distributed import local_tensor
from zoo.launch import spawn

RANK = 4
LR = 1e-2
LR_RATIO = 0.2
# (out, in) of the three linear layers: m > n, m = n and m < n.
SHAPES = ((16, 8), (16, 16), (4, 16))


class Tiny(L.LightningModule):
    """Three linear layers; builds its own optimizer and records what the callbacks ask of it."""

    def __init__(self, rank: int = RANK, optimizer: str = "cosmos", batches: int = 5, nan_at_call: Optional[int] = None,
                 schedule_lr: bool = False, record_to: Optional[str] = None, **opt_kwargs: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        self.rank, self.optimizer_kind, self.batches = rank, optimizer, batches
        self.nan_at_call, self.schedule_lr, self.opt_kwargs = nan_at_call, schedule_lr, opt_kwargs
        self.record_to = record_to
        self.requests: list[tuple[int, Optional[int]]] = []  # (optimizer.step call, power_iters)
        self.U_changed_at: list[int] = []  # optimizer steps after which the first matrix's U changed
        self._calls = 0
        self._last_U: Optional[torch.Tensor] = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # The data is a function of the optimizer step, not of the loader: after a resume
        # Lightning does not replay a plain DataLoader's batches in the same order.
        micro = batch_idx % self.trainer.accumulate_grad_batches
        g = torch.Generator().manual_seed(1000 * self.trainer.global_step + micro)
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.nan_at_call is not None and self.trainer.global_step + 1 == self.nan_at_call:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_kind == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=LR)
        opt = COSMOS(cosmos_param_groups(self), rank=self.rank, lr=LR, lr_ratio=LR_RATIO, weight_decay=0.0,
                     **self.opt_kwargs)
        original = opt.request_refresh

        def recording_request(power_iters: Optional[int] = None) -> None:
            self.requests.append((self.trainer.global_step + 1, power_iters))
            original(power_iters)

        opt.request_refresh = recording_request
        if not self.schedule_lr:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.optimizer_kind != "cosmos":
            return
        state = self.trainer.optimizers[0].state.get(self.net[0].weight)
        if state and (self._last_U is None or not torch.equal(state["U"], self._last_U)):
            self._last_U = state["U"].clone()
            self.U_changed_at.append(self.trainer.global_step)

    def on_train_end(self) -> None:
        if self.record_to:  # for runs in other processes (ddp_spawn)
            with open(f"{self.record_to}.rank{self.global_rank}.json", "w") as f:
                json.dump({"requests": self.requests}, f)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.batches, 1)), batch_size=1)  # only sets the epoch length


def fit(root, callbacks, max_steps=10, accumulate=1, logger=True, ckpt_path=None, model=None, name="run", devices=1,
        strategy="auto", **kw):
    L.seed_everything(0, verbose=False)
    model = model or Tiny(**kw)
    tb = TensorBoardLogger(str(root), name=name, version=0) if logger else False
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
        accumulate_grad_batches=accumulate, logger=tb,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def events(trainer) -> EventAccumulator:
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(trainer) -> dict[str, dict[int, float]]:
    """Logged scalars keyed by the optimizer step ``t`` they are about (1, 2, ...). The callbacks
    log on Lightning's axis, the step's 0-based index ``t - 1`` (see test_callbacks_share_lightnings_axis)."""
    acc = events(trainer)
    return {tag: {e.step + 1: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def request_steps(model) -> list[int]:
    return [t for t, _ in model.requests]


# ---------------------------------------------------------------------- EigenbasisRefresh
def test_constant_schedule_refreshes_on_multiples(tmp_path):
    trainer, model = fit(tmp_path, [EigenbasisRefresh("constant", interval=3)], max_steps=10)
    assert request_steps(model) == [3, 6, 9]
    # The basis really changes on the initialisation and on those steps only.
    assert model.U_changed_at == [1, 3, 6, 9]
    # manual while attached (see the mid-run checkpoint test), its own value again after fit
    assert all(g["update_interval"] == 1 for g in trainer.optimizers[0].param_groups if g["algorithm"] == "cosmos")
    logged = scalars(trainer)
    assert logged["refresh/count"] == {1: 0.0, 3: 1.0, 6: 2.0, 9: 3.0}
    assert logged["refresh/interval"] == {1: 2.0, 3: 3.0, 6: 3.0, 9: 3.0}
    assert set(logged["refresh/drift_max"]) == {3, 6, 9}
    for step, drift in logged["refresh/drift_max"].items():
        assert 0.0 <= logged["refresh/drift_mean"][step] <= drift <= 1.0
        assert drift > 0.0  # a refresh with fresh gradients moves the basis


def test_gradient_accumulation_does_not_multiply_refreshes(tmp_path):
    cb = EigenbasisRefresh("constant", interval=3)
    trainer, model = fit(tmp_path, [cb], max_steps=10, accumulate=2, logger=False, batches=10)
    assert trainer.global_step == 10 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 20
    assert request_steps(model) == [3, 6, 9]
    assert model.U_changed_at == [1, 3, 6, 9]
    assert cb.refreshes == 3 and cb.next_refresh == 12


def test_dense_then_sparse_schedule_and_power_iters(tmp_path):
    cb = EigenbasisRefresh("dense_then_sparse", warmup=3, interval=1, growth=2.0, max_interval=4, power_iters=(3, 2, 1))
    trainer, model = fit(tmp_path, [cb], max_steps=12)
    # Every step up to 3, then gaps 1, 2, 4, 4 (capped).
    assert model.requests == [(2, 3), (3, 2), (4, 1), (6, 1), (10, 1)]
    assert model.U_changed_at == [1, 2, 3, 4, 6, 10]
    logged = scalars(trainer)
    assert logged["refresh/count"] == {1: 0.0, 2: 1.0, 3: 2.0, 4: 3.0, 6: 4.0, 10: 5.0}
    assert logged["refresh/power_iters"] == {2: 3.0, 3: 2.0, 4: 1.0, 6: 1.0, 10: 1.0}
    assert cb.next_refresh == 14


def test_adaptive_schedule_follows_its_rule(tmp_path):
    low, high, growth = 0.02, 0.08, 2.0
    cb = EigenbasisRefresh("adaptive", interval=2, min_interval=1, max_interval=6, drift_low=low, drift_high=high,
                           growth=growth)
    trainer, model = fit(tmp_path, [cb], max_steps=40, batches=40)
    logged = scalars(trainer)
    points = sorted(logged["refresh/drift_max"])
    assert points == request_steps(model) and points[0] == 2
    gap = 2
    for i, t in enumerate(points):
        drift = logged["refresh/drift_max"][t]
        if drift < low:
            gap = min(6, math.ceil(gap * growth))
        elif drift > high:
            gap = max(1, math.floor(gap / growth))
        assert logged["refresh/interval"][t] == gap
        if i + 1 < len(points):
            assert points[i + 1] - t == gap
    gaps = {logged["refresh/interval"][t] for t in points}
    assert len(gaps) > 1 and all(1 <= g <= 6 for g in gaps)  # it did adapt, within bounds


@pytest.mark.parametrize("schedule, interval", [("dense_then_sparse", 1), ("adaptive", 2)])
def test_resume_continues_the_schedule_exactly(tmp_path, schedule, interval):
    # The resume at step 5 falls where the current gap differs from the initial one (8 and 1).
    def callback():
        return EigenbasisRefresh(schedule, warmup=2, interval=interval, growth=2.0, max_interval=8, drift_low=0.02,
                                 drift_high=0.08)

    full, full_model = fit(tmp_path, [callback()], max_steps=10, name="full")
    first, first_model = fit(tmp_path, [callback()], max_steps=5, name="first")
    ckpt = tmp_path / "step5.ckpt"
    first.save_checkpoint(ckpt)
    second, second_model = fit(tmp_path, [callback()], max_steps=10, name="second", ckpt_path=str(ckpt))

    assert second.global_step == 10
    assert request_steps(first_model) + request_steps(second_model) == request_steps(full_model)
    if schedule == "dense_then_sparse":
        assert request_steps(full_model) == [2, 3, 5, 9]
    resumed_count = {**scalars(first)["refresh/count"], **scalars(second)["refresh/count"]}
    assert resumed_count == scalars(full)["refresh/count"]
    for a, b in zip(full_model.parameters(), second_model.parameters()):
        assert torch.equal(a, b)  # bitwise: same data, state and refresh steps


def test_skipped_step_does_not_count(tmp_path):
    # Call 6 has a NaN gradient: COSMOS skips it (and drops the request), so the refresh of
    # optimizer step 6 happens on call 7 and the one of step 9 on call 10.
    cb = EigenbasisRefresh("constant", interval=3)
    trainer, model = fit(tmp_path, [cb], max_steps=10, logger=False, nan_at_call=6, on_nonfinite="skip")
    assert request_steps(model) == [3, 6, 7, 10]
    assert model.U_changed_at == [1, 3, 7, 10]
    assert cb.refreshes == 3


def test_resume_without_callback_state_starts_from_the_restored_step(tmp_path):
    first, _ = fit(tmp_path, [], max_steps=5, name="first")
    first.save_checkpoint(tmp_path / "plain.ckpt")
    cb = EigenbasisRefresh("constant", interval=3)
    _, model = fit(tmp_path, [cb], max_steps=10, name="second", ckpt_path=str(tmp_path / "plain.ckpt"))
    assert request_steps(model) == [6, 9] and cb.refreshes == 2


class _SaveAt(L.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path, self.live_intervals = step, path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            self.live_intervals = [g["update_interval"] for g in trainer.optimizers[0].param_groups
                                   if g["algorithm"] == "cosmos"]


def test_mid_run_checkpoint_carries_the_optimizers_own_interval(tmp_path):
    # The callback drives refreshes by setting update_interval=0 on the live groups; a checkpoint
    # saved meanwhile still says 3, so resuming it without the callback refreshes every 3 steps.
    saver = _SaveAt(4, tmp_path / "mid.ckpt")
    trainer, _ = fit(tmp_path, [EigenbasisRefresh("constant", interval=1), saver], max_steps=6, logger=False,
                     update_interval=3)
    assert saver.live_intervals and set(saver.live_intervals) == {0}
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert [g["update_interval"] for g in saved if g["algorithm"] == "cosmos"] == [3] * len(saver.live_intervals)
    # after fit the callback hands the optimizer its own value back
    assert {g["update_interval"] for g in trainer.optimizers[0].param_groups if g["algorithm"] == "cosmos"} == {3}
    _, resumed = fit(tmp_path, [], max_steps=10, logger=False, ckpt_path=str(tmp_path / "mid.ckpt"), update_interval=3)
    assert resumed.U_changed_at == [5, 6, 9]  # 5: the first step seen by this run; then COSMOS's own 6 and 9


def test_refresh_state_dict_roundtrip():
    cb = EigenbasisRefresh("dense_then_sparse", warmup=4)
    state = {"schedule": "dense_then_sparse", "step": 7, "next_refresh": 9, "gap": 4, "refreshes": 5}
    cb.load_state_dict(state)
    assert cb.state_dict() == state and cb.next_refresh == 9 and cb.refreshes == 5


@pytest.mark.parametrize("callback", [lambda: EigenbasisRefresh(), lambda: SubspaceMonitor(every_n_steps=1)])
def test_cosmos_callbacks_warn_and_stand_aside_for_other_optimizers(tmp_path, callback):
    # A config that swaps COSMOS for AdamW keeps its callbacks list: they must not stop the run.
    cb = callback()
    name = type(cb).__name__
    with pytest.warns(UserWarning, match=rf"{name} acts on a lit_cosmos.COSMOS optimizer, but the trainer's "
                                         rf"optimizers are \['AdamW'\]: {name} does nothing"):
        trainer, _ = fit(tmp_path, [cb], max_steps=3, optimizer="adamw")
    assert trainer.global_step == 3
    assert not [tag for tag in scalars(trainer) if tag.startswith(("refresh/", "subspace/"))]


def test_two_cosmos_optimizers_are_ambiguous():
    from types import SimpleNamespace

    from lit_cosmos.lightning.callbacks.eigenbasis_refresh import find_cosmos_optimizer

    opts = [COSMOS([nn.Parameter(torch.zeros(2, 2))]) for _ in range(2)]
    with pytest.raises(MisconfigurationException, match=r"needs exactly one lit_cosmos.COSMOS .* \['COSMOS', 'COSMOS'\]"):
        find_cosmos_optimizer(SimpleNamespace(optimizers=opts), "SubspaceMonitor")


def test_two_refresh_callbacks_are_rejected(tmp_path):
    # Lightning refuses two stateful callbacks with the same state_key, before fit.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `EigenbasisRefresh`"):
        fit(tmp_path, [EigenbasisRefresh(), EigenbasisRefresh()], max_steps=2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EigenbasisRefresh("linear"), "schedule must be one of"),
        (lambda: EigenbasisRefresh(interval=0), "interval must be an int >= 1"),
        (lambda: EigenbasisRefresh(warmup=-1), "warmup must be an int >= 0"),
        (lambda: EigenbasisRefresh("adaptive", interval=200), "min_interval <= interval <= max_interval"),
        (lambda: EigenbasisRefresh(growth=1.0), "growth must be a finite number > 1"),
        (lambda: EigenbasisRefresh(drift_low=0.5, drift_high=0.1), "drift_low <= drift_high"),
        (lambda: EigenbasisRefresh(drift_reduce="median"), "drift_reduce must be one of"),
        (lambda: EigenbasisRefresh(power_iters=0), "power_iters must be"),
        (lambda: EigenbasisRefresh(power_iters=[]), "power_iters must be"),
        (lambda: MemoryMonitor(every_n_steps=0), "every_n_steps must be an int >= 1"),
        (lambda: MemoryMonitor(rank=-1), "rank must be an int >= 0"),
        (lambda: SubspaceMonitor(every_n_steps=0), "every_n_steps must be an int >= 1"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------- MemoryMonitor
def cosmos_numel(m: int, n: int, rank: int) -> int:
    r = min(rank, m, n)
    return m * n + m * r + n * r + r * r


def test_memory_monitor_cosmos_equals_formula(tmp_path):
    trainer, model = fit(tmp_path, [MemoryMonitor(every_n_steps=4)], max_steps=10, accumulate=2)
    logged = scalars(trainer)
    matrices = sum(cosmos_numel(m, n, RANK) for m, n in SHAPES)
    biases = sum(2 * m for m, _ in SHAPES)  # AdamW: exp_avg + exp_avg_sq
    steps = 2 * len(SHAPES)  # one float32 step counter per parameter
    held = 4 * (matrices + biases + steps)
    formula = {
        "cosmos": 4 * (matrices + biases),
        "adamw": 4 * (sum(2 * m * n for m, n in SHAPES) + biases),
        "muon": 4 * (sum(m * n for m, n in SHAPES) + biases),
        "soap": 4 * (sum(2 * m * n + 2 * m * m + 2 * n * n for m, n in SHAPES) + biases),
    }
    assert set(logged["memory/state_bytes"]) == {1, 4, 8}  # first step, then every 4 optimizer steps
    assert logged["memory/state_bytes"][1] == held
    assert logged["memory/state_bytes_all_ranks"][1] == held  # one process
    assert logged["memory/state_bytes_model"][1] == formula["cosmos"]  # the formula's convention: no steps
    for name, expected in formula.items():
        assert logged[f"memory/formula_bytes/{name}"][1] == expected
    for name in ("adamw", "muon", "soap"):
        expected = 100.0 * (1.0 - formula["cosmos"] / formula[name])
        assert logged[f"memory/savings_pct/{name}"][8] == pytest.approx(expected, abs=1e-4)
    assert "memory/savings_pct/cosmos" not in logged and "memory/cuda_max_allocated_bytes" not in logged
    text = events(trainer).Tensors("memory/table/text_summary")
    assert len(text) == 1 and text[0].step == 0
    table = text[0].tensor_proto.string_val[0].decode()
    # The COSMOS formula names its rank; the last column is the held state over each formula.
    assert f"| formula COSMOS (rank {RANK}) | {formula['cosmos']:,} |" in table and "| 1.00x |" in table
    assert f"| {formula['cosmos'] / formula['adamw']:.2f}x |" in table and "held / this" in table


class LoggingTiny(Tiny):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def test_callbacks_share_lightnings_axis(tmp_path):
    """One x-axis for a run: what a callback logs about optimizer step t sits where Lightning logs
    that step's training loss and learning rate (0-based: t - 1)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = [MemoryMonitor(every_n_steps=1), EigenbasisRefresh("constant", interval=1),
                 SubspaceMonitor(every_n_steps=1, histograms=False), LearningRateMonitor(logging_interval="step")]
    trainer, _ = fit(tmp_path, callbacks, max_steps=4, model=LoggingTiny())
    acc = events(trainer)
    raw = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = [0, 1, 2, 3]
    for tag in ("train/loss", "lr-COSMOS/cosmos", "memory/state_bytes", "refresh/count", "subspace/energy_mean"):
        assert raw[tag] == expected, (tag, raw[tag])


def test_memory_monitor_names_the_rank_it_assumes_for_other_optimizers(tmp_path):
    trainer, _ = fit(tmp_path, [MemoryMonitor(rank=RANK)], max_steps=1, optimizer="adamw")
    table = events(trainer).Tensors("memory/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| formula COSMOS (rank {RANK}) |" in table and "held by AdamW" in table


def test_memory_monitor_works_with_plain_adamw(tmp_path):
    cb = MemoryMonitor(rank=RANK)
    trainer, model = fit(tmp_path, [cb], max_steps=2, optimizer="adamw")
    numel = sum(p.numel() for p in model.parameters())
    report = cb.last_report
    assert report["memory/state_bytes"] == 4 * (2 * numel + 6)
    assert report["memory/state_bytes_model"] == 4 * 2 * numel and report["memory/savings_pct/adamw"] == 0.0
    # A plain torch optimizer's 2-D parameters count as matrices for the other formulas.
    assert report["memory/formula_bytes/cosmos"] == 4 * (sum(cosmos_numel(m, n, RANK) for m, n in SHAPES)
                                                         + sum(2 * m for m, _ in SHAPES))
    assert report["memory/savings_pct/muon"] < 0 < report["memory/savings_pct/soap"]


# ---------------------------------------------------------------------- SubspaceMonitor
def test_subspace_monitor_logs_summaries_and_histograms(tmp_path):
    cb = SubspaceMonitor(every_n_steps=3)
    trainer, model = fit(tmp_path, [cb, EigenbasisRefresh("constant", interval=2)], max_steps=9, accumulate=2,
                         schedule_lr=True)
    logged = scalars(trainer)
    assert not any("/net." in tag for tag in logged)  # no per-layer scalars by default
    for metric in ("energy", "update_rms", "update_rms_ratio", "ns_error"):
        for stat in ("mean", "min", "max"):
            assert set(logged[f"subspace/{metric}_{stat}"]) == {3, 6, 9}
    for step in (3, 6, 9):
        assert 0.0 <= logged["subspace/energy_min"][step] <= logged["subspace/energy_max"][step] <= 1.0
        assert 0.0 <= logged["subspace/ns_error_min"][step] <= logged["subspace/ns_error_max"][step] <= 2.0
        # LambdaLR(1 / (1 + s)): optimizer step t runs with the factor of scheduler step t - 1.
        expected = LR_RATIO * LR / step
        for stat in ("min", "max"):
            assert logged[f"subspace/update_rms_{stat}"][step] == pytest.approx(expected, rel=1e-3)
            assert logged[f"subspace/update_rms_ratio_{stat}"][step] == pytest.approx(1.0, rel=1e-3)
    hist = events(trainer)
    assert set(hist.Tags()["histograms"]) == {"subspace/energy", "subspace/update_rms", "subspace/ns_error"}
    assert [h.step + 1 for h in hist.Histograms("subspace/energy")] == [3, 6, 9]
    assert hist.Histograms("subspace/energy")[0].histogram_value.num == len(SHAPES)


def test_subspace_energy_is_one_when_the_basis_spans_the_rows(tmp_path):
    # rank >= min(m, n): U is n x n (orthogonal) for m >= n, so every gradient is captured.
    cb = SubspaceMonitor(every_n_steps=2, per_layer=True, histograms=False)
    trainer, model = fit(tmp_path, [cb], max_steps=6, rank=64)
    logged = scalars(trainer)
    names = [n for n, p in model.named_parameters() if p.ndim == 2]
    for name, (m, n) in zip(names, SHAPES):
        energy = logged[f"subspace/energy/{name}"]
        assert set(energy) == {2, 4, 6}
        if n <= m:
            assert all(v == pytest.approx(1.0, abs=1e-5) for v in energy.values())
        else:
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in energy.values())
    assert set(cb.last_values) == {"energy", "update_rms", "update_rms_ratio", "ns_error"}
    assert set(cb.last_values["energy"]) == set(names)
    # Only the m < n layer has a Newton-Schulz part (COSMOS skips it when r = n).
    assert set(cb.last_values["ns_error"]) == {names[2]}
    assert not events(trainer).Tags()["histograms"]


def test_subspace_monitor_needs_a_logger(tmp_path):
    with pytest.raises(MisconfigurationException, match="no logger"):
        fit(tmp_path, [SubspaceMonitor()], max_steps=2, logger=False)


def _twin_polar_errors(monkeypatch, dtype, *args, **kwargs):
    """``ns_polar_error(*args, dtype=dtype, **kwargs)`` with its Newton-Schulz replaced by float64
    twins of ``dtype`` arithmetic (tests/_numerics.py), one per seed."""
    from lit_cosmos.core import kernels

    values = []
    with single_thread():
        for seed in range(4):
            rounding = RandomRounding(U32, seed)
            twin = newton_schulz_twin(rounding)
            monkeypatch.setattr(kernels, "newton_schulz",
                                lambda X, steps, dtype, twin=twin: twin(X.double(), steps, dtype).float())
            with rounding:
                values.append(ns_polar_error(*args, dtype=dtype, **kwargs))
    monkeypatch.undo()
    return values


def test_ns_polar_error_reference_values(monkeypatch):
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(24, 12))
    # Equal singular values: NS keeps them equal, so O is proportional to the polar factor.
    # Its float32 rounding is ~steps * 3 GEMMs * k u = 2e-5 at worst, with no amplification.
    assert ns_polar_error(3.0 * Q, steps=5, dtype=torch.float32) < 1e-4
    assert ns_polar_error(torch.zeros(6, 4), steps=5, dtype=torch.float32) == 0.0
    # A rank-deficient residual (R = X (I - U U^T) always is) with equal nonzero singular values:
    # the error is measured on R's range, so it is ~0 although O O^T is far from the identity.
    # What remains is roundoff in R's null directions, amplified ~a^5 = 490 by NS (3.4e-6 from
    # O's own float32 rounding, the same everywhere, plus the CPU's): bounded by SAFETY x its
    # float64 twins (~1.3e-4).
    A, _ = torch.linalg.qr(torch.randn(24, 8))
    B, _ = torch.linalg.qr(torch.randn(12, 8))
    O = 2.0 * A @ B.T
    assert torch.linalg.matrix_norm(O.T @ O / 4.0 - torch.eye(12)) > 1.0
    bound = SAFETY * max(_twin_polar_errors(monkeypatch, torch.float32, O, steps=5))
    assert ns_polar_error(O, steps=5, dtype=torch.float32) < bound
    assert 0.05 < ns_polar_error(torch.randn(64, 32), steps=5, dtype=torch.float32) < 0.4
    # bf16 NS leaks rounding noise into span(U); COSMOS projects it out, and so does the monitor:
    # projected, bf16 is within bf16 noise of fp32 (SAFETY x the twins' spread, ~0.004); raw, the
    # leak puts it beyond that noise (0.11 away here, 0.16-0.24 in the twins).
    U, _ = torch.linalg.qr(torch.randn(16, 8))
    X = torch.randn(24, 16)
    R = X - X @ U @ U.T
    bf16_raw = ns_polar_error(R, steps=5, dtype=torch.bfloat16)
    bf16 = ns_polar_error(R, steps=5, dtype=torch.bfloat16, basis=U)
    fp32 = ns_polar_error(R, steps=5, dtype=torch.float32, basis=U)
    noise = SAFETY * max(abs(e - fp32) for e in _twin_polar_errors(monkeypatch, torch.bfloat16, R, steps=5, basis=U))
    assert abs(bf16 - fp32) < noise < abs(bf16_raw - fp32), (bf16, fp32, bf16_raw, noise)


# ---------------------------------------------------------------------- 2 processes (gloo, CPU)
def _callbacks():
    return [
        EigenbasisRefresh("adaptive", interval=2, max_interval=6, drift_low=0.02, drift_high=0.08),
        MemoryMonitor(every_n_steps=5),
        SubspaceMonitor(every_n_steps=4, per_layer=True),
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_work_split_gives_the_single_process_figures(tmp_path):
    # Every rank draws the same data, so DDP's averaged gradients equal one process's and the
    # whole run (schedule, drifts, subspace figures) must too, although under work split each
    # rank holds the state of the matrices it owns only.
    one, one_model = fit(tmp_path, _callbacks(), max_steps=12, name="one", comm="ddp_split")
    ddp, _ = fit(tmp_path, _callbacks(), max_steps=12, name="ddp", devices=2, strategy="ddp_spawn",
                 comm="ddp_split", record_to=str(tmp_path / "ddp"))
    requests = [json.load(open(tmp_path / f"ddp.rank{r}.json"))["requests"] for r in range(2)]
    assert requests[0] == requests[1] == [list(x) for x in one_model.requests]  # the same schedule on both ranks
    a, b = scalars(one), scalars(ddp)
    for tag in ("refresh/drift_max", "refresh/drift_mean", "refresh/interval", "subspace/energy_mean",
                "subspace/ns_error_max", "subspace/update_rms_ratio_min"):
        assert a[tag].keys() == b[tag].keys(), tag
        for step in a[tag]:
            assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-4, abs=1e-6), (tag, step)
    names = [n for n, p in one_model.named_parameters() if p.ndim == 2]
    assert all(f"subspace/energy/{n}" in b for n in names)  # gathered from both owners
    # The whole model's state counted once is the formula; summed over ranks the replicated
    # AdamW state (biases) counts twice and each matrix once, on its owner.
    matrices = sum(cosmos_numel(m, n, RANK) for m, n in SHAPES)
    biases = sum(2 * m for m, _ in SHAPES)
    assert b["memory/state_bytes_model"][1] == a["memory/state_bytes_model"][1] == 4 * (matrices + biases)
    assert b["memory/state_bytes_all_ranks"][1] == 4 * (matrices + 2 * biases + len(SHAPES) + 2 * len(SHAPES))
    assert b["memory/state_bytes"][1] < b["memory/state_bytes_all_ranks"][1]


def _fsdp_monitor_worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    initial = [torch.randn(s, generator=g) for s in SHAPES] + [torch.randn(4, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in initial] for _ in range(3)]

    def run(params, shard):
        groups = [{"params": params[:-1], "algorithm": "cosmos"}, {"params": params[-1:], "algorithm": "adamw"}]
        opt = COSMOS(groups, rank=RANK, lr=LR, lr_ratio=LR_RATIO, weight_decay=0.0, ns_dtype="float32")
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = shard(grad)
            snapshot = {id(p): local_tensor(p).detach().clone() for p in params[:-1]}
            opt.step()
        values = SubspaceMonitor().measure(opt, snapshot)  # collective under FSDP2
        return values, memory_figures([opt])

    ref_values, ref_memory = run([nn.Parameter(t.clone()) for t in initial], lambda t: t)
    sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in initial]
    values, memory = run(sharded, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    assert values.keys() == ref_values.keys() == {"energy", "update_rms", "update_rms_ratio", "ns_error"}
    for metric in values:
        for name, want in ref_values[metric].items():
            assert values[metric][name] == pytest.approx(want, rel=1e-4, abs=1e-6), (metric, name)
    assert memory["memory/state_bytes_model"] == ref_memory["memory/state_bytes_model"]
    assert memory["memory/state_bytes_model"] == 4 * (sum(cosmos_numel(m, n, RANK) for m, n in SHAPES) + 2 * 4)
    assert memory["memory/state_bytes"] < ref_memory["memory/state_bytes"]  # this rank holds shards
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_monitors_under_fsdp2_equal_one_process():
    spawn(_fsdp_monitor_worker, 2)


# ---------------------------------------------------------------------- FinalCheckpoint
def checkpointed_fit(root, checkpoint, callbacks=(), max_steps=6, model=None):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, default_root_dir=str(root),
        callbacks=[checkpoint, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model or LoggingTiny())
    return trainer


def saved_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_without_final_checkpoint_last_ckpt_is_the_last_trigger(tmp_path):
    # Lightning's own behaviour, the reason for FinalCheckpoint: saves on multiples of K only.
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpointed_fit(tmp_path, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True))
    assert saved_step(tmp_path / "last.ckpt") == 4


@pytest.mark.parametrize("save_last", [True, "link"])
def test_final_checkpoint_saves_the_last_step(tmp_path, save_last):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=save_last)
    checkpointed_fit(tmp_path, checkpoint, [FinalCheckpoint()])
    assert saved_step(tmp_path / "last.ckpt") == 6
    # The top-k file of the final step replaced the step-4 one (save_top_k=1), as its own trigger would.
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == ["epoch=1-step=6.ckpt"]
    assert os.path.islink(tmp_path / "last.ckpt") == (save_last == "link")


def test_final_checkpoint_of_a_monitored_checkpoint_writes_only_last(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="train/loss", every_n_train_steps=4, save_last="link")
    checkpointed_fit(tmp_path, checkpoint, [FinalCheckpoint()])
    # The best-of file stays the step-4 one (the final step has no fresh score); last.ckpt, no longer a
    # link to it, holds step 6, and the step-4 file still holds step 4.
    assert [p.name for p in tmp_path.glob("epoch=*.ckpt")] == ["epoch=0-step=4.ckpt"]
    assert not os.path.islink(tmp_path / "last.ckpt") and saved_step(tmp_path / "last.ckpt") == 6
    assert saved_step(tmp_path / "epoch=0-step=4.ckpt") == 4


class RaiseAt(L.Callback):
    """Sends Ctrl-C (SIGINT) to this process after optimizer step ``step``, or raises KeyboardInterrupt
    before the next batch starts ("between"), or inside step ``step`` ("in_step")."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.how == "in_step" and trainer.global_step + 1 == self.step:
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.how == "between" and trainer.global_step == self.step:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.how == "sigint" and trainer.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


@pytest.fixture
def restore_sigint():
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after an interrupt


def test_ctrl_c_stops_after_the_step_and_saves_it(tmp_path, restore_sigint):
    from lightning.pytorch.callbacks import ModelCheckpoint

    final = FinalCheckpoint()
    trainer = checkpointed_fit(tmp_path, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True),
                               [RaiseAt(2, "sigint"), final], max_steps=10)
    assert trainer.global_step == 2 and final.interrupted
    assert saved_step(tmp_path / "last.ckpt") == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back after fit


def test_keyboard_interrupt_between_steps_saves_the_last_step(tmp_path, restore_sigint):
    from lightning.pytorch.callbacks import ModelCheckpoint

    final = FinalCheckpoint()
    with pytest.raises(SystemExit):  # Lightning's own handling of KeyboardInterrupt
        checkpointed_fit(tmp_path, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True),
                         [RaiseAt(3, "between"), final], max_steps=10)
    assert final.interrupted and saved_step(tmp_path / "last.ckpt") == 3


def test_keyboard_interrupt_inside_a_step_saves_nothing_and_says_so(tmp_path, restore_sigint):
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.warns(UserWarning, match=r"Interrupted during step 6: nothing saved, the checkpoints hold step 4"):
        with pytest.raises(SystemExit):
            checkpointed_fit(tmp_path, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True),
                             [RaiseAt(6, "in_step"), FinalCheckpoint()], max_steps=10)
    assert saved_step(tmp_path / "last.ckpt") == 4
