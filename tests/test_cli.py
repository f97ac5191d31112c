"""The ``lit-cosmos`` CLI (zoo/cli.py), the configs under configs/ and zoo/lit_model.py's CausalLM.

Every YAML is parsed and instantiated through the real LightningCLI, so a renamed argument fails
here instead of for a user; layered configs merge as documented; the same module trains for real
with COSMOS, AdamW and Muon picked by an overlay; logs, the saved config and checkpoints land
where the docs say and load back.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_cosmos import COSMOS
from zoo.cli import _is_fsdp1, build_cli, main
from zoo.data import TextDataModule
from zoo.lit_model import CausalLM

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))
DEBUG = str(CONFIGS / "debug.yaml")
SIZES = sorted(p.stem for p in (CONFIGS / "models").glob("*.yaml"))
OPTIMS = {"cosmos": "lit_cosmos.COSMOS", "adamw": "torch.optim.AdamW", "muon": "lit_cosmos.MuonAdamW"}
STRATEGIES = {
    "ddp": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp2": "lightning.pytorch.strategies.ModelParallelStrategy",
}
PRECISIONS = {"bf16-mixed": "bf16-mixed", "32": "32-true"}
HAS_MUON = hasattr(torch.optim, "Muon")


@pytest.fixture(autouse=True)
def _clean_cli_env(monkeypatch, tmp_path):
    """Run every test in its own folder (runs/ lands there), with no stray PL_* variables, and
    with a sys.argv that does not look like extra command-line flags to LightningCLI."""
    for key in list(os.environ):
        if key.startswith("PL_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(sys, "argv", ["lit-cosmos"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One prepared copy of the stdlib corpus for the whole session."""
    return str(tmp_path_factory.mktemp("data_cache"))


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def config_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------- every YAML, through the real CLI
@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_parses_and_instantiates(path, capsys):
    config = print_config(capsys, "--config", str(path))
    assert config["model"]["class_path"] == "zoo.lit_model.CausalLM"
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"

    cli = build_cli(["--config", str(path)], run=False)
    assert isinstance(cli.model, CausalLM)
    assert isinstance(cli.datamodule, TextDataModule)
    assert cli.model.model is None  # built in configure_model, not at instantiation
    # data.vocab_size is linked into the model: the embedding always matches the tokens.
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size


def test_yaml_set_is_complete():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_YAMLS}
    expected = {
        "quickstart.yaml", "debug.yaml",
        *(f"models/{s}.yaml" for s in ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "gpt2-124m", "gpt2-350m")),
        *(f"optim/{o}.yaml" for o in OPTIMS),
        *(f"strategy/{s}.yaml" for s in STRATEGIES),
        *(f"precision/{p}.yaml" for p in PRECISIONS),
    }
    assert expected <= names


@pytest.mark.parametrize("size,optim", list(itertools.product(SIZES, OPTIMS)))
def test_layered_configs_merge(size, optim, capsys):
    """size + optimizer + strategy + precision: each layer sets its own keys, later layers win."""
    i = SIZES.index(size) + list(OPTIMS).index(optim)
    strategy = list(STRATEGIES)[i % 2]
    precision = list(PRECISIONS)[(i // 2) % 2]
    config = print_config(
        capsys, *config_args(f"models/{size}", f"optim/{optim}", f"strategy/{strategy}", f"precision/{precision}")
    )
    model_args = config["model"]["init_args"]
    assert model_args["model"] == size
    assert model_args["optimizer"]["class_path"] == OPTIMS[optim]
    assert config["trainer"]["strategy"]["class_path"] == STRATEGIES[strategy]
    assert config["trainer"]["precision"] == PRECISIONS[precision]
    assert config["trainer"]["logger"]["init_args"]["name"] == size  # from the size file, untouched
    # No hyperparameter of the size file's (default) optimizer leaks into the overlay's class.
    if optim == "adamw":
        assert "rank" not in model_args["optimizer"]["init_args"]


def test_optimizer_overlay_replaces_quickstart_cosmos_without_leaking(capsys):
    config = print_config(capsys, *config_args("quickstart", "optim/adamw"))
    opt = config["model"]["init_args"]["optimizer"]
    assert opt["class_path"] == "torch.optim.AdamW"
    assert opt["init_args"]["lr"] == 0.001
    assert not {"rank", "lr_ratio", "gamma"} & set(opt["init_args"])


def test_print_config_defaults(capsys):
    config = print_config(capsys)
    assert config["model"]["class_path"] == "zoo.lit_model.CausalLM"
    assert config["model"]["init_args"]["model"] == "llama-tiny"
    assert config["model"]["init_args"]["optimizer"] == "zoo.lit_model.cosmos_optimizer"
    assert config["data"]["class_path"].endswith("TextDataModule")
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "runs"
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert callbacks == ["lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.LearningRateMonitor"]
    # vocab_size is a link target (from data.vocab_size), not a free setting.
    assert "vocab_size" not in config["model"]["init_args"]
    # LightningCLI's top-level optimizer keys are off: they would bypass routing and FSDP2.
    assert "optimizer" not in config and "lr_scheduler" not in config


def test_top_level_optimizer_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", DEBUG, "--optimizer", "torch.optim.AdamW", "--print_config"])


def test_env_vars(monkeypatch, capsys):
    monkeypatch.setenv("PL_FIT__TRAINER__MAX_STEPS", "7")
    assert print_config(capsys)["trainer"]["max_steps"] == 7
    # Environment variables replace defaults; config files and flags win over them.
    assert print_config(capsys, "--config", DEBUG)["trainer"]["max_steps"] == 3
    assert print_config(capsys, "--config", DEBUG, "--trainer.max_steps", "5")["trainer"]["max_steps"] == 5


def test_one_path_needs_no_list(tmp_path):
    (tmp_path / "notes.txt").write_text("some text " * 50)
    cli = build_cli(["--config", DEBUG, "--data.init_args.paths", str(tmp_path)], run=False)
    assert cli.datamodule.paths == [str(tmp_path)]


def test_cosmos_callbacks_stand_aside_when_an_overlay_swaps_in_adamw(data_cache, tmp_path):
    # quickstart.yaml carries EigenbasisRefresh and SubspaceMonitor; the adamw overlay must still run.
    with pytest.warns(UserWarning, match=r"EigenbasisRefresh acts on a lit_cosmos.COSMOS optimizer"):
        cli = build_cli(["fit", *config_args("quickstart", "optim/adamw"), "--trainer.max_steps", "2",
                         "--model.init_args.warmup_steps", "1",
                         "--trainer.limit_val_batches", "1", "--data.cache_dir", data_cache])
    assert cli.trainer.global_step == 2 and type(cli.trainer.optimizers[0]) is torch.optim.AdamW


def test_vocab_size_follows_the_data():
    cli = build_cli(config_args("models/llama-60m"), run=False)
    assert cli.model.config.vocab_size == 257  # byte-level default data
    assert cli.model.config.n_embd == 512
    cli = build_cli(config_args("models/llama-60m", "data/litdata-remote"), run=False)
    assert cli.model.config.vocab_size == 32000


# ---------------------------------------------------------------------- FSDP1 is refused early
@pytest.mark.parametrize(
    "strategy",
    ["fsdp", "fsdp_cpu_offload", '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}'],
)
def test_fsdp1_is_refused_before_anything_is_built(strategy, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data must not be prepared when the strategy is refused")

    monkeypatch.setattr(TextDataModule, "prepare_data", fail)
    with pytest.raises(ValueError, match=r"FSDP1 .*flattened 1-D shards.*ModelParallelStrategy"):
        build_cli(["fit", "--config", DEBUG, "--trainer.strategy", strategy])


def test_is_fsdp1():
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert _is_fsdp1("fsdp") and _is_fsdp1({"class_path": "lightning.pytorch.strategies.FSDPStrategy"})
    assert not _is_fsdp1("ddp") and not _is_fsdp1("auto") and not _is_fsdp1(None)
    assert not _is_fsdp1({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"})
    assert not _is_fsdp1(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))


# ---------------------------------------------------------------------- real training, optimizer from YAML
TRAIN_CASES = [
    ("cosmos", "32", COSMOS),
    ("cosmos", "bf16-mixed", COSMOS),
    ("adamw", "32", torch.optim.AdamW),
    pytest.param("muon", "32", None, marks=pytest.mark.skipif(not HAS_MUON, reason="torch.optim.Muon needs torch>=2.9")),
]


@pytest.mark.parametrize("optim,precision,expected", TRAIN_CASES)
def test_trains_with_the_optimizer_from_yaml(optim, precision, expected, data_cache):
    if expected is None:
        from lit_cosmos import MuonAdamW as expected
    overlay = yaml.safe_load((CONFIGS / "optim" / f"{optim}.yaml").read_text())
    lr = overlay["model"]["init_args"]["optimizer"]["init_args"]["lr"]

    cli = build_cli(
        ["fit", *config_args("debug", f"optim/{optim}", f"precision/{precision}"), "--data.cache_dir", data_cache]
    )
    trainer = cli.trainer
    assert trainer.global_step == 3
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is expected
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"cosmos", "adamw", "adamw_no_decay"}  # the mixin's routing, whatever the class
    assert all(g["initial_lr"] == lr for g in groups.values())  # the overlay's lr, then the schedule
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())


# ---------------------------------------------------------------------- logs, saved config, checkpoints
@pytest.fixture
def debug_run(data_cache, tmp_path):
    main(["fit", "--config", DEBUG, "--data.cache_dir", data_cache])  # the console entry point
    log_dir = tmp_path / "runs" / "debug" / "version_0"
    assert log_dir.is_dir()
    return log_dir


def test_logs_config_and_checkpoint_land_in_runs(debug_run, capsys):
    log_dir = debug_run
    assert (log_dir / "config.yaml").is_file() and (log_dir / "hparams.yaml").is_file()
    assert glob.glob(str(log_dir / "events.out.tfevents.*"))
    assert (log_dir / "checkpoints" / "last.ckpt").exists()

    logged = scalars(log_dir)
    assert {"train/loss", "train/tokens", "val/loss", "val/ppl", "lr-COSMOS/cosmos"} <= set(logged)
    assert [v for _, v in logged["train/tokens"]] == [4 * 64 * s for s in (1, 2, 3)]  # batch x block per step
    (_, val_loss), = logged["val/loss"]
    (_, val_ppl), = logged["val/ppl"]
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-5)

    # The saved config is a complete config: it parses back to the same run.
    saved = print_config(capsys, "--config", str(log_dir / "config.yaml"))
    original = print_config(capsys, "--config", DEBUG)
    assert saved["model"] == original["model"] and saved["data"]["init_args"]["block_size"] == 64


def test_checkpoint_loads_and_resumes(debug_run, data_cache):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    # load_from_checkpoint rebuilds the module from the CLI's saved hyperparameters.
    model = CausalLM.load_from_checkpoint(ckpt, map_location="cpu")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert model.config.name == "debug" and model.tokens_seen == 3 * 4 * 64
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][key], rtol=0, atol=0)
    assert state["hyper_parameters"]["optimizer"] == "zoo.lit_model.cosmos_optimizer"

    cli = build_cli(
        ["fit", "--config", DEBUG, "--data.cache_dir", data_cache, "--trainer.max_steps", "5", "--ckpt_path", str(ckpt)]
    )
    assert cli.trainer.global_step == 5
    assert cli.model.tokens_seen == 5 * 4 * 64  # the count continues across the resume

    cli = build_cli(["validate", "--config", DEBUG, "--data.cache_dir", data_cache, "--ckpt_path", str(ckpt)])
    val_loss = cli.trainer.callback_metrics["val/loss"].item()
    assert math.isfinite(val_loss)

    # test and predict run on the held-out split: the test loss of a checkpoint is its val loss
    cli = build_cli(["test", "--config", DEBUG, "--data.cache_dir", data_cache, "--ckpt_path", str(ckpt),
                     "--trainer.limit_test_batches", "2"])  # the debug config validates on 2 batches
    assert cli.trainer.callback_metrics["test/loss"].item() == pytest.approx(val_loss, rel=1e-6)
    cli = build_cli(["predict", "--config", DEBUG, "--data.cache_dir", data_cache, "--ckpt_path", str(ckpt),
                     "--trainer.limit_predict_batches", "2"])
    preds = cli.trainer.predict_loop.predictions
    assert len(preds) == 2 and preds[0].shape == (4, 64) and preds[0].dtype == torch.long


def test_block_size_longer_than_the_model_is_refused(data_cache):
    with pytest.raises(ValueError, match="data.block_size=128 is longer than the model's block_size=64"):
        build_cli(["fit", "--config", DEBUG, "--data.cache_dir", data_cache, "--data.block_size", "128"])


# ---------------------------------------------------------------------- the module on its own
def test_causal_lm_unit():
    model = CausalLM("debug", model_overrides={"n_layer": 1}, vocab_size=300)
    assert model.config.n_layer == 1 and model.config.vocab_size == 300
    with pytest.raises(RuntimeError, match="configure_model"):
        model(torch.zeros(1, 4, dtype=torch.long))
    model.configure_model()
    net = model.model
    model.configure_model()
    assert model.model is net  # idempotent
    assert model.num_parameters() == sum(p.numel() for p in net.parameters())
    batch = torch.randint(0, 300, (2, 9))
    assert model.predict_step(batch[:, :-1], 0).shape == (2, 8)
    loss = model._loss(batch)
    assert loss.item() == pytest.approx(math.log(300), rel=0.05)  # init: close to uniform
    # A callable that cannot be pickled (a lambda) stays out of the hyperparameters, so checkpoints still save.
    assert "optimizer" in model.hparams
    assert "optimizer" not in CausalLM("debug", optimizer=lambda params: torch.optim.AdamW(params)).hparams
    with pytest.raises(ValueError, match="unknown model name"):
        CausalLM("llama-2b")
    with pytest.raises(ValueError, match="unknown Config field"):
        CausalLM("debug", model_overrides={"layers": 3})


def test_default_optimizer_is_cosmos_with_the_schedule_settings():
    from lit_cosmos.lightning.mixin import CosmosConfig
    from zoo.lit_model import cosmos_optimizer

    model = CausalLM("debug", warmup_steps=2, min_lr_ratio=0.5)
    assert model.optimizer is cosmos_optimizer and model.lr_scheduler is None
    assert model.cosmos_config == CosmosConfig(warmup_steps=2, min_lr_ratio=0.5)
    model.configure_model()
    # No trainer here: give the schedule its length directly.
    model.cosmos_config = CosmosConfig(warmup_steps=2, min_lr_ratio=0.5, max_steps=10)
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], COSMOS)
    factor = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [factor(s) for s in (0, 1, 10)] == [0.5, 1.0, 0.5]


# ---------------------------------------------------------------------- the quickstart
@pytest.mark.slow
def test_quickstart_trains_and_the_loss_falls(data_cache, tmp_path):
    cli = build_cli(
        [
            "fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.cache_dir", data_cache,
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--model.warmup_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        ]
    )
    assert type(cli.trainer.optimizers[0]) is COSMOS
    assert cli.model.config.name == "llama-tiny"
    log_dir = tmp_path / "runs" / "quickstart" / "version_0"
    logged = scalars(log_dir)
    train = [v for _, v in logged["train/loss"]]
    val = [v for _, v in logged["val/loss"]]
    assert len(val) == 2 and val[1] < val[0]
    assert train[-1] < train[0] - 0.5  # from ~ln(257) = 5.55
    assert (log_dir / "checkpoints" / "last.ckpt").exists() and (log_dir / "config.yaml").is_file()
    # the COSMOS callbacks of the quickstart wrote their plots
    assert [v for _, v in logged["refresh/count"]][-1] == 7  # every step from step 2 on
    savings = [v for _, v in logged["memory/savings_pct/adamw"]]  # logged after the first step
    assert len(savings) == 1 and 0.0 < savings[0] < 50.0


# ---------------------------------------------------------------------- FSDP2 across 2 processes (gloo)
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_overlay_trains_on_two_cpu_processes(data_cache, tmp_path):
    """The fsdp2 overlay as documented: ModelParallelStrategy + fully_shard in configure_model.
    Lightning re-launches the command for rank 1, so it runs as a real console command."""
    cmd = [
        sys.executable, "-m", "zoo.cli", "fit", *config_args("debug", "strategy/fsdp2"),
        "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size", "2",
        "--data.cache_dir", data_cache, "--trainer.enable_progress_bar", "false",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log_dir = tmp_path / "runs" / "debug" / "version_0"
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()  # a distributed checkpoint: one folder of shards
    logged = scalars(log_dir)
    assert [v for _, v in logged["train/tokens"]] == [2 * 4 * 64 * s for s in (1, 2, 3)]  # both ranks counted
    assert all(math.isfinite(v) for _, v in logged["train/loss"])
