"""The benchmarks run end to end on tiny shapes and write well-formed results.

Benchmarks are not tests: nothing here asserts a wall-clock time, only that every figure is
there, finite and positive, and that the memory figures agree with the closed-form formulas
(exactly, for COSMOS).
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lit_cosmos import COSMOS, formula_numel, optimizer_state_bytes
from zoo.bench import BENCHMARKS, common, gpu, optimizer_step, scaling
from zoo.bench import main as zoo_bench_main

ROOT = Path(__file__).resolve().parents[1]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_files(out: Path) -> dict:
    assert (out / "results.md").read_text().startswith("# ")
    data = json.loads((out / "results.json").read_text())
    for key in ("cpu", "torch", "torch_threads", "command"):
        assert key in data["machine"]
    png = out / "results.png"
    if common.pyplot() is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


@pytest.fixture(scope="module")
def step_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimizer_step")
    result = optimizer_step.run(["--quick", "--out", str(out), "--no-progress", "--threads", "1"])
    return out, result


def test_optimizer_step_outputs(step_result):
    out, _ = step_result
    data = _check_files(out)
    assert data["benchmark"] == "optimizer_step"
    expected = {"adamw", "muon", "cosmos", "cosmos_ui"}
    assert expected <= set(data["optimizers"])
    (model,) = data["models"]
    assert model["model"] == "debug" and model["numel_matrices"] > 0 and model["numel_rest"] > 0
    rows = {r["optimizer"]: r for r in model["rows"]}
    assert set(rows) == set(data["optimizers"])
    for r in rows.values():
        for key in ("step_s", "matrix_step_s", "first_step_s", "vs_adamw", "vs_muon", "matrix_vs_muon", "state_bytes"):
            assert _positive(r[key]), (r["optimizer"], key, r[key])
        assert len(r["step_s_rounds"]) == data["settings"]["repeats"]
    assert rows["adamw"]["vs_adamw"] == 1.0 and rows["muon"]["vs_muon"] == 1.0
    md = (out / "results.md").read_text()
    for r in rows.values():
        assert r["label"] in md


def test_optimizer_step_memory_matches_formulas(step_result):
    _, result = step_result
    (model,) = result["models"]
    rows = {r["optimizer"]: r for r in model["rows"]}
    for opt in ("cosmos", "cosmos_ui"):
        assert rows[opt]["state_equals_formula"] is True
        assert rows[opt]["state_bytes"] == rows[opt]["state_bytes_formula"] == rows[opt]["state_bytes_lit_cosmos"]
    # torch AdamW and Muon hold exactly what the formulas say, too (step counters left out).
    for opt in ("adamw", "muon", "soap", "galore"):
        if opt in rows:
            assert rows[opt]["state_bytes"] == rows[opt]["state_bytes_formula"], opt
    # Recompute the COSMOS figure independently from the matrix shapes.
    rank = result["settings"]["rank"]
    mats = sum(formula_numel(tuple(m["shape"]), "cosmos", rank) for m in model["matrices"])
    assert rows["cosmos"]["state_bytes"] == 4 * (mats + 2 * model["numel_rest"])
    full = model["formula_full_model_vs_adamw"]
    assert full["adamw"] == 1.0 and 0 < full["cosmos"] < 1


def test_scaling_outputs(tmp_path):
    out = tmp_path / "scaling"
    scaling.run(["--quick", "--out", str(out), "--no-progress", "--threads", "1"])
    data = _check_files(out)
    s = data["settings"]
    assert [r["rank"] for r in data["rank_sweep"]] == s["ranks"]
    assert [r["n"] for r in data["size_sweep"]] == s["sizes"]
    for row in data["rank_sweep"] + data["size_sweep"]:
        for opt in ("cosmos", "muon", "adamw"):
            assert _positive(row[opt]["step_s"]) and _positive(row[opt]["vs_muon"]), (row, opt)
    assert data["rank_sweep"][-1]["effective_rank"] == min(s["ranks"][-1], *s["shape"])


def test_state_bytes_walks_nested_state():
    p = torch.nn.Parameter(torch.randn(6, 4))
    p.grad = torch.randn(6, 4)
    opt = COSMOS([p], rank=2)
    opt.step()
    assert common.state_bytes(opt) == optimizer_state_bytes(opt, include_step=False) == 4 * formula_numel((6, 4), "cosmos", 2)
    assert common.state_bytes(opt, include_step=True) == optimizer_state_bytes(opt, include_step=True)

    class Holder:
        def __init__(self) -> None:
            self.basis = torch.zeros(3, 2)

    fake = torch.optim.SGD([p])
    fake.state[p] = {"step": torch.tensor(1.0), "lists": [torch.zeros(5), []], "obj": Holder()}
    assert common.state_bytes(fake) == 4 * (5 + 6)


def test_markdown_table_and_ratio():
    table = common.markdown_table(["a", "b"], [["x", 1.23456], ["y", float("nan")]])
    assert table.splitlines()[1] == "|---|---|" and "| x | 1.23 |" in table and "| y | - |" in table
    assert common.ratio_median([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_cli_entry_point():
    proc = subprocess.run([sys.executable, "-m", "zoo.bench", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in BENCHMARKS:
        assert name in proc.stdout
    with pytest.raises(SystemExit, match="unknown benchmark"):
        zoo_bench_main(["nope"])
    with pytest.raises(SystemExit):
        optimizer_step.run(["--optimizers", "sgd"])
    with pytest.raises(SystemExit, match="unknown model"):
        optimizer_step.run(["--models", "llama-nope"])


def test_threads_restored_after_run(tmp_path):
    before = torch.get_num_threads()
    scaling.run(["--quick", "--out", str(tmp_path), "--no-progress", "--threads", "1", "--no-soap",
                 "--ranks", "0", "4", "--sizes", "8", "--repeats", "1"])
    assert torch.get_num_threads() == before
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch_threads"] == 1
    assert data["machine"]["command"].startswith("python -m zoo.bench scaling --quick")
    assert all("soap" not in r for r in data["size_sweep"])


def test_distributed_quick(tmp_path):
    import json

    from zoo import bench

    result = bench.run("distributed", ["--quick", "--out", str(tmp_path), "--no-progress", "--world", "2"])
    res = result["results"]["2"]
    assert set(res) == {"replicated", "ddp_split", "fsdp2"}
    # per-rank state: the split keeps only owned matrices, FSDP2 only its rows of M and V
    assert res["ddp_split"]["state_bytes_per_rank_max"] < res["replicated"]["state_bytes_per_rank_max"]
    assert res["fsdp2"]["state_bytes_per_rank_max"] < res["replicated"]["state_bytes_per_rank_max"]
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["worlds"] == [2]
    assert (tmp_path / "results.md").read_text().startswith("# distributed")


# ---------------------------------------------------------------------- the GPU evidence pack
def _closed_form_state_bytes(model: str) -> dict[str, int]:
    """State bytes of the pack's tiny shapes from the matrix shapes alone: torch's AdamW and Muon
    keep bfloat16 state (2 bytes) like the parameters, COSMOS float32 (4 bytes)."""
    from zoo.config import Config
    from zoo.model import GPT

    with torch.device("meta"):
        m = GPT(Config.from_name(model, **gpu.TINY))
    mats = [p for n, p in m.named_parameters() if p.ndim == 2 and "blocks." in n]
    rest = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in mats)
    mn = sum(p.numel() for p in mats)
    cosmos = sum(formula_numel(tuple(p.shape), "cosmos", 64) for p in mats)
    return {"fused_adamw": 2 * 2 * (mn + rest), "muon": 2 * (mn + 2 * rest), "cosmos": 4 * (cosmos + 2 * rest)}


@pytest.mark.slow
def test_gpu_pack_dry_run(tmp_path):
    out = tmp_path / "gpu"
    gpu.run(["--dry-run", "--out", str(out), "--no-progress", "--data-cache", str(tmp_path / "data")])
    data = _check_files(out)
    assert data["benchmark"] == "gpu" and data["partial"] is False and data["notes"] == []
    assert data["gpu"]["available"] is False and data["settings"]["device"] == "cpu"
    assert list(data["budget"]["stages"]) == ["setup", *gpu.MODELS, "convergence"]
    assert all(_positive(s["used_s"]) for s in data["budget"]["stages"].values())
    known = inspect.signature(COSMOS).parameters
    assert [m["model"] for m in data["optimizer_step"]] == list(gpu.MODELS)
    for m in data["optimizer_step"]:
        rows = {r["candidate"]: r for r in m["rows"]}
        assert list(rows) == list(gpu.CANDIDATES)  # every required candidate, none dropped
        for name, r in rows.items():
            if all(k in known for k in gpu.CANDIDATES[name][1] or {}):
                assert r["status"] == "ok", (m["model"], name, r["status"])
                for key in ("step_ms", "vs_fused_adamw", "vs_muon", "first_step_s", "state_bytes"):
                    assert _positive(r[key]), (m["model"], name, key, r.get(key))
                assert len(r["step_s_rounds"]) == m["repeats"]
            else:
                assert r["status"].startswith(gpu.UNAVAILABLE), (name, r["status"])
        assert rows["fused_adamw"]["vs_fused_adamw"] == 1.0 and rows["muon"]["vs_muon"] == 1.0
        # measured state = the formula at the state dtype's bytes = the closed form from the shapes
        for name, expected in _closed_form_state_bytes(m["model"]).items():
            assert rows[name]["state_bytes"] == rows[name]["state_bytes_formula"] == expected, name
        assert rows["fused_adamw"]["state_dtypes"] == ["torch.bfloat16"]
        assert rows["cosmos"]["state_dtypes"] == ["torch.float32"]
        if rows["cosmos_compiled"]["status"] == "ok":
            assert rows["cosmos_compiled"]["compile_s"] >= 0
    conv = data["convergence"]
    assert [r["optimizer"] for r in conv["rows"]] == ["adamw", "muon", "cosmos"]
    for r in conv["rows"]:
        assert r["diverged"] is None and r["final_val_loss"] < r["curve"]["mean"][0] - 0.1, r
        assert _positive(r["opt_step_vs_adamw"])
    md = (out / "results.md").read_text()
    assert md.startswith("# gpu: GPU evidence pack, dry run") and "Time budget" in md
    for label, _ in gpu.CANDIDATES.values():
        assert label in md


def test_gpu_pack_candidates_and_budget(monkeypatch):
    p = torch.nn.Parameter(torch.randn(6, 4))
    groups = [{"params": [p], "algorithm": "cosmos"}]
    reason = gpu.cosmos_candidate(groups, 1e-3, no_such_option=True)
    assert isinstance(reason, str) and reason.startswith(gpu.UNAVAILABLE) and "no_such_option" in reason
    assert isinstance(gpu.cosmos_candidate(groups, 1e-3, rank=2), COSMOS)
    with pytest.raises(ValueError, match="unknown candidate"):
        gpu.make_candidate("sgd", groups)
    # rounds shrink to fit the time left, never below the minimum (which is then flagged)
    assert gpu.choose_repeats(1.0, 10.0, most=30) == (10, True)
    assert gpu.choose_repeats(0.1, 100.0, most=30) == (30, True)
    assert gpu.choose_repeats(1.0, 1.0, most=30) == (gpu.MIN_REPEATS, False)
    # a stage gets what is left after the plans of the stages still to come (and the reserve);
    # on a stopped clock, so that the figures do not depend on how busy the machine is
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(perf_counter=lambda: 1000.0))
    budget = gpu.Budget(40.0, {"a": 10.0, "b": 20.0}, start=1000.0 - 15.0)
    assert budget.reserve_s == 10.0
    assert budget.grant("a") == -5.0 and budget.grant("b") == 15.0


def test_gpu_pack_bad_arguments():
    with pytest.raises(SystemExit, match="--lr"):
        gpu.run(["--dry-run", "--lr", "sgd=1e-3"])
    with pytest.raises(SystemExit, match="--lr"):
        gpu.run(["--dry-run", "--lr", "cosmos=-1"])
    with pytest.raises(SystemExit, match="--dry-run runs on the CPU"):
        gpu.run(["--dry-run", "--device", "cuda"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            gpu.run([])
