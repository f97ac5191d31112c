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
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_cosmos import COSMOS
from zoo.cli import CLIError, _is_fsdp1, build_cli, main
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
    "fsdp2": "lit_cosmos.lightning.FSDP2Strategy",
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
    assert not _is_fsdp1("fsdp2") and not _is_fsdp1({"class_path": "lit_cosmos.lightning.FSDP2Strategy"})


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
    # the mixin's routing, whatever the class; the matrix group named after what the optimizer does with it
    matrices = {"cosmos": "cosmos", "muon": "muon"}.get(optim, "matrices")
    assert set(groups) == {matrices, "adamw", "adamw_no_decay"}
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


def test_block_size_longer_than_the_model_is_refused_before_data_preparation(monkeypatch):
    monkeypatch.setattr(TextDataModule, "prepare_data", _no_data_preparation)
    with pytest.raises(CLIError, match=r"data.init_args.block_size=128 is longer than the model's block_size=64 "
                                       r"\(debug\); lower data.init_args.block_size or set "
                                       r"model.init_args.model_overrides: \{block_size: 128\}"):
        build_cli(["fit", "--config", DEBUG, "--data.block_size", "128"])


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
    """The fsdp2 overlay as documented: FSDP2Strategy + fully_shard in configure_model.
    Lightning re-launches the command for rank 1, so it runs as a real console command."""
    cmd = [  # --trainer.devices alone: the overlay's data-parallel size follows it
        sys.executable, "-m", "zoo.cli", "fit", *config_args("debug", "strategy/fsdp2"),
        "--trainer.devices", "2", "--data.cache_dir", data_cache, "--trainer.enable_progress_bar", "false",
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


# ---------------------------------------------------------------------- a new user's first hour
def _no_data_preparation(*args, **kwargs):
    raise AssertionError("data must not be prepared: the mistake can be reported before")


def lit_cosmos(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console command (``python -m zoo.cli`` is what the ``lit-cosmos`` script runs), output merged."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LIT_COSMOS_"))}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def main_error(capsys, *args: str) -> str:
    """The one-line message ``main`` ends with (stderr's last line), after checking the exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


CONSOLE_MISTAKES = {
    "bad-value": (["--model.init_args.optimizer", "lit_cosmos.COSMOS", "--model.init_args.optimizer.rank", "-1"],
                  "error: invalid model.init_args.optimizer.init_args.rank=-1 in the arguments: must be an int >= 0"),
    "missing-path": (["--data.init_args.paths", "{tmp}/missing"],
                     "error: data.init_args.paths=['{tmp}/missing']: data path '{tmp}/missing' does not exist"),
    "yaml-typo": (["--config", "{tmp}/typo.yaml"],
                  "error: model.init_args.optimizer.init_args.rnak: lit_cosmos.COSMOS has no argument 'rnak'; "
                  "did you mean 'rank'?"),
}


@pytest.mark.parametrize(
    "case", [name if name == "bad-value" else pytest.param(name, marks=pytest.mark.slow) for name in CONSOLE_MISTAKES]
)
def test_console_mistakes_are_short_and_end_with_the_message(case, tmp_path):
    """Through the real entry point: a mistake is reported before any data is prepared, in a few
    lines ending with the message and the key as typed; a misspelt key gets a did-you-mean."""
    (tmp_path / "typo.yaml").write_text("model:\n  init_args:\n    optimizer:\n      class_path: lit_cosmos.COSMOS\n"
                                        "      init_args: {rnak: 8}\n")
    extra, message = CONSOLE_MISTAKES[case]
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    cache = tmp_path / "cache"
    done = lit_cosmos("fit", "--config", DEBUG, "--data.cache_dir", str(cache), *extra, cwd=tmp_path)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 2, done.stdout
    assert lines[-1] == message.format(tmp=tmp_path)
    assert len(lines) <= 8 and "Traceback" not in done.stdout, done.stdout
    assert not cache.exists()  # nothing was prepared
    assert not (tmp_path / "runs").exists()  # and no run folder left behind


def test_mistyped_keys_get_a_did_you_mean(capsys, tmp_path):
    assert main_error(capsys, "fit", "--config", DEBUG, "--model.init_args.optimizer", "lit_cosmos.COSMOS",
                      "--model.init_args.optimizer.rnak", "8") == (
        "error: model.init_args.optimizer.init_args.rnak: lit_cosmos.COSMOS has no argument 'rnak'; "
        "did you mean 'rank'?")
    assert main_error(capsys, "fit", "--config", DEBUG, "--data.init_args.blok_size", "8") == (
        "error: data.init_args.blok_size: zoo.data.TextDataModule has no argument 'blok_size'; "
        "did you mean 'block_size'?")
    assert main_error(capsys, "fit", "--config", DEBUG, "--model.init_args.warmup_step", "8").endswith(
        "did you mean 'warmup_steps'?")
    assert main_error(capsys, "fit", "--config", DEBUG, "--model.init_args.optimizer", "lit_cosmos.COSMS") == (
        "error: model.init_args.optimizer: lit_cosmos has no 'COSMS'; did you mean 'COSMOS'?")
    assert main_error(capsys, "fit", "--trainer.max_stepz", "5").endswith("did you mean '--trainer.max_steps'?")
    # In YAML: a misspelt section would be ignored without a word, a misspelt Trainer key is refused.
    (tmp_path / "top.yaml").write_text("modle:\n  init_args: {model: debug}\n")
    (tmp_path / "empty.yaml").write_text("modle:\n  init_args: {}\n")  # nothing in it that jsonargparse checks
    (tmp_path / "trainer.yaml").write_text("trainer:\n  max_stepz: 5\n")
    assert main_error(capsys, "fit", "--config", DEBUG, "--config", str(tmp_path / "top.yaml")) == (
        "error: Subcommand 'fit' does not accept option 'modle.init_args.model'; did you mean 'model.init_args.model'?")
    assert main_error(capsys, "fit", "--config", DEBUG, "--config", str(tmp_path / "empty.yaml")).startswith(
        f"error: {tmp_path / 'empty.yaml'}: unknown top-level key 'modle'; did you mean 'model'? (the keys are ")
    assert main_error(capsys, "fit", "--config", DEBUG, "--config", str(tmp_path / "trainer.yaml")) == (
        "error: Subcommand 'fit' does not accept option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", str(CONFIGS / "optim" / "adamw.yaml"), "--model.init_args.optimizer.init_args.lr", "-1"],
         "error: model.init_args.optimizer (torch.optim.AdamW): Invalid learning rate: -1.0"),
        (["--model.init_args.warmup_fraction", "2"],
         "error: invalid model.init_args.warmup_fraction=2.0: must be in [0, 1)"),
        (["--model.init_args.model", "llama-2b"],
         "error: model.init_args.model='llama-2b': unknown model name 'llama-2b'"),
        (["--data.init_args.paths", "[]"], "error: data.init_args.paths=[] names no file: give text files or folders"),
        (["--data.init_args.val_fraction", "0.5", "--data.init_args.test_fraction", "0.5"],
         "error: data.init_args.val_fraction=0.5 + data.init_args.test_fraction=0.5 must be < 1"),
        (["--trainer.strategy", "lit_cosmos.lightning.FSDP2Strategy", "--trainer.devices", "2",
          "--trainer.strategy.data_parallel_size", "8"],
         "error: FSDP2Strategy: data_parallel_size=8 x tensor_parallel_size=1 must equal the world size"),
    ],
    ids=["optimizer-lr", "warmup", "model-name", "empty-paths", "fractions", "fsdp2-sizes"],
)
def test_bad_values_name_the_key_before_any_data_is_prepared(args, message, capsys, monkeypatch):
    monkeypatch.setattr(TextDataModule, "prepare_data", _no_data_preparation)
    assert main_error(capsys, "fit", "--config", DEBUG, *args).startswith(message)


def test_help_leads_to_the_cosmos_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "arguments: see the end of this help" in out.split("options:")[0]
    tail = out[out.index("The options above are Lightning's Trainer's"):]
    assert "--model.help CausalLM" in tail and "--model.init_args.optimizer.help lit_cosmos.COSMOS" in tail
    for optimizer, argument in (("lit_cosmos.COSMOS", "lr_ratio"), ("lit_cosmos.MuonAdamW", "muon_lr"),
                                ("torch.optim.AdamW", "amsgrad")):
        assert optimizer in tail and argument in tail
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "CausalLM"])
    assert "lit_cosmos.MuonAdamW" in capsys.readouterr().out  # among the known optimizer classes


@pytest.mark.slow
def test_a_smoke_run_and_fast_dev_run_need_no_other_change(tmp_path, data_cache):
    """The warmup_steps of a config longer than a smoke run shrinks with a warning naming the key
    typed; fast_dev_run works; the last checkpoint holds the last step; the output has none of the
    known noise; OMP_NUM_THREADS is the user's choice."""
    config = tmp_path / "smoke.yaml"
    config.write_text("model:\n  init_args:\n    warmup_steps: 20\n")
    common = ["--config", DEBUG, "--config", str(config), "--data.cache_dir", data_cache,
              "--trainer.enable_progress_bar", "false"]
    done = lit_cosmos("fit", *common, "--trainer.max_steps", "5", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:]
    assert "model.init_args.warmup_steps=20 is not shorter than this run's 5 optimizer steps: the LR warmup is " \
           "shrunk to 2 steps" in done.stdout
    assert "CPU threads: 1 (OMP_NUM_THREADS=1)" in done.stdout
    noises = ("litlogger", "LeafSpec", "`IterableDataset` has `__len__`", "Create an account", "dirpath has changed",
              "Traceback")
    for noise in noises:
        assert noise not in done.stdout, noise
    ckpt = tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 5  # not the step-3 validation
    done = lit_cosmos("fit", *common, "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir()) == ["version_0"]  # fast_dev_run logs nothing


def test_resume_with_another_model_or_optimizer_is_refused(debug_run, tmp_path):
    """LightningCLI would train the checkpoint's model and optimizer and exit 0; through the real
    CLI the mismatch is an error naming both."""
    ckpt = str(debug_run / "checkpoints" / "last.ckpt")
    done = lit_cosmos("fit", "--config", str(CONFIGS / "quickstart.yaml"), "--ckpt_path", ckpt, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        f"error: ckpt_path={ckpt!r} does not match the config, which would be silently replaced by the checkpoint's: "
        "model.init_args.model: the checkpoint has 'debug', the config 'llama-tiny'; model.init_args.optimizer: the "
        "checkpoint has zoo.lit_model.cosmos_optimizer, the config lit_cosmos.COSMOS. Resume with the checkpoint's "
        "settings (its run folder holds them in config.yaml), or leave out --ckpt_path to start a new run")


def test_resume_refuses_another_optimizer_argument_in_process(debug_run, monkeypatch, capsys):
    monkeypatch.setattr(TextDataModule, "prepare_data", _no_data_preparation)
    ckpt = str(debug_run / "checkpoints" / "last.ckpt")
    message = main_error(capsys, "fit", "--config", DEBUG, "--config", str(CONFIGS / "optim" / "adamw.yaml"),
                         "--ckpt_path", ckpt)
    assert "model.init_args.optimizer: the checkpoint has zoo.lit_model.cosmos_optimizer, the config " \
           "torch.optim.AdamW" in message
    assert main_error(capsys, "fit", "--config", DEBUG, "--ckpt_path", str(debug_run / "nothing.ckpt")).endswith(
        "ckpt_path='" + str(debug_run / "nothing.ckpt") + "' does not exist")


def test_a_run_continues_and_is_evaluated_in_its_own_folder(debug_run, data_cache, tmp_path, recwarn):
    ckpt = str(debug_run / "checkpoints" / "last.ckpt")
    cli = build_cli(["fit", "--config", DEBUG, "--data.cache_dir", data_cache, "--trainer.max_steps", "5",
                     "--ckpt_path", ckpt])
    assert cli.trainer.log_dir == str(Path("runs") / "debug" / "version_0")
    assert not any("dirpath has changed" in str(w.message) or "exists and is not empty" in str(w.message)
                   for w in recwarn.list)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 5  # the link follows the run
    build_cli(["validate", "--config", DEBUG, "--data.cache_dir", data_cache, "--ckpt_path", ckpt])
    assert sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir()) == ["version_0"]  # no new version
    assert (debug_run / "validate-config.yaml").is_file() and (debug_run / "config.yaml").is_file()
    # One axis: the validation of the step-5 checkpoint sits where the fit's own validation of step 5 would (4).
    assert [s for s, _ in scalars(debug_run)["val/loss"]][-1] == 4


def test_a_run_on_your_own_text_is_filed_under_its_name(tmp_path, data_cache):
    text = tmp_path / "my_notes.txt"
    text.write_text("notes on a new optimizer " * 200)
    cli = build_cli(["fit", "--config", DEBUG, "--data.cache_dir", data_cache, "--data.paths", str(text),
                     "--trainer.max_steps", "1"])
    assert Path(cli.trainer.log_dir) == Path("runs") / "debug-my_notes" / "version_0"
    # A name given on the command line is kept as is.
    cli = build_cli(["--config", DEBUG, "--data.cache_dir", data_cache, "--data.paths", str(text),
                     "--trainer.logger.init_args.name", "mine"], run=False)
    assert Path(cli.trainer.log_dir) == Path("runs") / "mine" / "version_0"


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, data_cache, capsys):
    text = tmp_path / "short.txt"
    text.write_text("too short for a block of 64 tokens")
    message = main_error(capsys, "fit", "--config", DEBUG, "--data.cache_dir", str(tmp_path / "cache"),
                         "--data.paths", str(text))
    assert message.startswith("error: data.init_args.block_size=64 is longer than the data")
    assert not (tmp_path / "runs").exists()


class SigintAt(L.Callback):
    """Ctrl-C after optimizer step ``step`` (a test helper reachable by class path: ``test_cli.SigintAt``)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_saves_the_last_step_and_exits_130(tmp_path, data_cache):
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", DEBUG, "--data.cache_dir", data_cache, "--trainer.max_steps", "50",
                  "--trainer.callbacks+=test_cli.SigintAt", "--trainer.callbacks.step", "2"])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert exit_info.value.code == 130
    ckpt = tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_cpu_threads_follow_the_free_cores_unless_the_user_chose(monkeypatch, data_cache):
    from zoo import resources

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    monkeypatch.setattr(resources, "load_average", lambda: 2.0)  # a busy 2-core machine
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    build_cli(["--config", DEBUG], run=False, auto_threads=True)
    assert chosen == [1] and os.environ["OMP_NUM_THREADS"] == "1"  # processes started later agree
    monkeypatch.setattr(resources, "load_average", lambda: 0.1)  # idle: torch's own default, 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    build_cli(["--config", DEBUG, "--trainer.devices", "2"], run=False, auto_threads=True)
    assert chosen == [1, 1]  # two processes share the two cores
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    build_cli(["--config", DEBUG], run=False, auto_threads=True)
    assert chosen == [1, 1]  # the user's setting is left alone
