"""The training benchmarks (``convergence``, ``refresh``) run end to end on tiny settings.

Benchmarks are not tests: nothing here asserts a wall-clock time or which optimizer wins. What is
checked: the outputs are complete and well formed, every loss is finite and fell from its start,
the sweep chose the rate with the lowest loss, a run is reproducible (so the sweep's run may stand
in for the first seed), and the refreshes counted from the bases equal the schedules' own counts.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from zoo.bench import BENCHMARKS, common, convergence, harness, refresh


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _have_soap() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data"))


def _check_files(out: Path, name: str) -> dict:
    assert (out / "results.md").read_text().startswith(f"# {name}:")
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == name
    for key in ("cpu", "torch", "torch_threads", "command"):
        assert key in data["machine"]
    assert data["machine"]["command"].startswith(f"python -m zoo.bench {name} --quick")
    assert data["machine"]["torch_threads"] == 1
    if common.pyplot() is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("total_s",):
        assert _finite(data["wall_clock"][key]) and data["wall_clock"][key] > 0
    return data


def _check_curve(run: dict, steps: int) -> None:
    curve = run["curve"]
    assert curve["step"][0] == 0 and curve["step"][-1] == steps
    assert len(curve["step"]) == len(curve["val_loss"]) >= 3
    assert all(_finite(v) for v in curve["val_loss"]), run["key"]
    # Training reduced the validation loss from the initial model's (~ln 257 = 5.55).
    assert curve["val_loss"][-1] < curve["val_loss"][0] - 0.1, (run["key"], curve["val_loss"])
    assert run["final_val_loss"] == curve["val_loss"][-1] and run["best_val_loss"] == min(curve["val_loss"])
    assert run["diverged"] is None


def test_registered():
    assert BENCHMARKS["convergence"] == "zoo.bench.convergence" and BENCHMARKS["refresh"] == "zoo.bench.refresh"


def test_convergence_quick(tmp_path, data_cache):
    out = tmp_path / "convergence"
    before = torch.get_num_threads()
    result = convergence.run(["--quick", "--out", str(out), "--no-progress", "--data-cache", data_cache])
    assert torch.get_num_threads() == before
    data = _check_files(out, "convergence")
    s = data["settings"]
    expected = ["adamw", "muon", "cosmos"] + (["soap"] if _have_soap() else [])
    assert s["optimizers"] == expected
    assert s["steps"] == 20 and s["tokens"] == 20 * s["tokens_per_step"] and s["eval_steps"][0] == 0

    # The sweep: every grid value of every optimizer, on the first seed; the lowest final loss wins.
    assert len(data["sweep"]) == sum(len(s["grids"][o]) for o in expected)
    for o in expected:
        entries = [e for e in data["sweep"] if e["optimizer"] == o]
        assert sorted(e["lr"] for e in entries) == sorted(s["grids"][o])
        assert data["chosen_lr"][o] == min(entries, key=lambda e: e["final_val_loss"])["lr"]
        for e in entries:
            _check_curve(e, s["steps"])

    # The final table: one row per optimizer, `seeds` seeds at the chosen rate, finite statistics.
    rows = {r["optimizer"]: r for r in data["rows"]}
    assert list(rows) == expected
    for o, r in rows.items():
        assert r["lr"] == data["chosen_lr"][o] and r["seeds"] == [0, 1]
        assert len(r["final_val_loss"]) == 2 and r["diverged"] == []
        for key in ("final_mean", "final_std", "best_mean", "best_std", "final_train_loss_mean"):
            assert _finite(r[key]), (o, key)
        assert r["best_mean"] <= r["final_mean"] + 1e-12
        assert _finite(r["opt_step_vs_adamw"]) and r["opt_step_vs_adamw"] > 0
        band = r["curve_band"]
        assert all(lo <= m <= hi for lo, m, hi in zip(band["min"], band["mean"], band["max"]))
    assert rows["adamw"]["opt_step_vs_adamw"] == 1.0
    assert rows["cosmos"]["delta_vs_cosmos_mean"] == 0.0
    for o, r in rows.items():
        paired = [a - b for a, b in zip(r["final_val_loss"], rows["cosmos"]["final_val_loss"])]
        assert r["delta_vs_cosmos_mean"] == pytest.approx(sum(paired) / len(paired))
    # The sweep's run at the chosen rate is the first seed of the final table.
    runs = {(r["optimizer"], r["seed"]): r for r in data["runs"]}
    assert len(runs) == 2 * len(expected)
    for (o, seed), r in runs.items():
        _check_curve(r, s["steps"])
        assert len(r["train_loss"]) == s["steps"]
        if seed == 0:
            sweep_run = next(e for e in data["sweep"] if e["optimizer"] == o and e["lr"] == data["chosen_lr"][o])
            assert sweep_run["curve"] == r["curve"]
    md = (out / "results.md").read_text()
    for o in expected:
        assert convergence.LABELS[o] in md
    assert result["paths"]["json"] == str(out / "results.json")


def test_refresh_quick(tmp_path, data_cache):
    out = tmp_path / "refresh"
    refresh.run(["--quick", "--out", str(out), "--no-progress", "--data-cache", data_cache])
    data = _check_files(out, "refresh")
    steps = data["settings"]["steps"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["ui=1", "ui=4", "ui=16", "adaptive"]
    # Measured refreshes (steps on which a basis changed) equal each schedule's own count.
    assert rows["ui=1"]["refreshes"] == [steps - 1]
    assert rows["ui=4"]["refreshes"] == [steps // 4] and rows["ui=16"]["refreshes"] == [steps // 16]
    assert rows["ui=4"]["refresh_steps_first_seed"] == list(range(4, steps + 1, 4))
    assert 0 < rows["adaptive"]["refreshes"][0] <= steps - 1
    assert data["notes"] == []
    for r in rows.values():
        assert r["refreshes"] == r["refreshes_expected"] and r["diverged"] == []
        assert _finite(r["final_mean"]) and _finite(r["opt_step_vs_ui1"]) and r["opt_step_vs_ui1"] > 0
    assert rows["ui=1"]["opt_step_vs_ui1"] == 1.0 and rows["ui=1"]["delta_vs_ui1_mean"] == 0.0
    for r in data["runs"]:
        _check_curve(r, steps)
    # The adaptive callback logged its gap at every point of its schedule.
    (log,) = rows["adaptive"]["adaptive_logs"]
    assert log and all("refresh/interval" in x and x["refresh/interval"] >= 1 for x in log)
    assert max(x["refresh/count"] for x in log) == rows["adaptive"]["refreshes"][0]
    assert all(0 <= x["refresh/drift_max"] <= 1 for x in log if "refresh/drift_max" in x)


def test_runs_are_reproducible(data_cache):
    """Same seed, same optimizer: identical losses, whatever else trains beside it in lockstep."""
    setup = harness.Setup(model="debug", overrides={"n_layer": 1}, block_size=16, batch_size=2, steps=4,
                              eval_every=2, warmup_steps=1, min_lr_ratio=0.1, val_batches=2)
    data = harness.Data(setup, data_cache)
    make = partial(harness.build_optimizer, "cosmos", lr=1e-2, rank=4)
    a = harness.Run.create("a", "cosmos", 1e-2, 0, setup, data.vocab_size, make)
    harness.train_lockstep([a], setup, data, show_progress=False)
    data = harness.Data(setup, data_cache)
    b = harness.Run.create("b", "cosmos", 1e-2, 0, setup, data.vocab_size, make)
    other = harness.Run.create("c", "adamw", 1e-3, 1, setup, data.vocab_size,
                               partial(harness.build_optimizer, "adamw", lr=1e-3))
    harness.train_lockstep([other, b], setup, data, show_progress=False)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.eval_steps == [0, 2, 4]


def test_bad_arguments(data_cache):
    with pytest.raises(SystemExit, match="--lr-grid"):
        convergence.run(["--quick", "--lr-grid", "sgd=1e-3"])
    with pytest.raises(SystemExit, match="must be > 0"):
        convergence.run(["--quick", "--lr-grid", "adamw=-1"])
    with pytest.raises(SystemExit, match="unknown model"):
        convergence.run(["--quick", "--model", "llama-nope"])
    with pytest.raises(SystemExit, match="must include 1"):
        refresh.run(["--quick", "--intervals", "4", "16", "--data-cache", data_cache])
    with pytest.raises(ValueError, match="unknown optimizer"):
        harness.build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2, 2))], lr=1e-3)
