"""CosmosMixin on a real Trainer: routing, the schedule's closed form, injection, resume, the CLI."""

import logging
import math
import sys
import warnings
from functools import partial
from typing import Optional

import lightning as L
import lightning_utilities.core.rank_zero as rank_zero_module

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI, LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_cosmos import COSMOS, CosmosConfig, CosmosMixin, MuonAdamW
from lit_cosmos.lightning.mixin import WarmupCosineLR

VOCAB, DIM, SEQ = 32, 16, 8


class TinyLM(L.LightningModule):
    """An existing-style module: no configure_optimizers of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


class CosmosTinyLM(CosmosMixin, TinyLM):  # the mixin added, nothing else changed
    pass


def _loader(batches=4, batch_size=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batches * batch_size, SEQ), generator=g)
    return DataLoader(TensorDataset(x, (3 * x + 1) % VOCAB), batch_size=batch_size, shuffle=False)


def _trainer(callbacks=(), **kw):
    kw.setdefault("max_steps", 8)
    return L.Trainer(accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw)


def _model(cls=CosmosTinyLM, seed=0, **attrs):
    torch.manual_seed(seed)
    model = cls()
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


class Recorder(L.Callback):
    """The loss of every step and the lr of every group just before each optimizer step."""

    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def _closed_form(s, warmup, total, floor):
    if s < warmup:
        return (s + 1) / warmup
    t = min(1.0, (s - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


# ---------------------------------------------------------------------- the default path
class FastCosmosTinyLM(CosmosTinyLM):
    cosmos_config = CosmosConfig(lr=2e-2)  # the default 2e-3 is slow on a 12-step toy


def test_trains_with_cosmos_and_expected_routing():
    model = _model(FastCosmosTinyLM)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = Recorder()
    messages = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = rank_zero_module.log
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = _trainer([rec], max_steps=12, max_epochs=-1)
        trainer.fit(model, _loader())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    opt = trainer.optimizers[0]
    assert type(opt) is COSMOS
    routing = {g["name"]: (g["algorithm"], g["param_names"]) for g in opt.param_groups}
    assert routing == {
        "cosmos": ("cosmos", ["fc1.weight", "fc2.weight"]),
        "adamw": ("adamw", ["embed.weight", "head.weight"]),
        "adamw_no_decay": ("adamw", ["fc1.bias", "fc2.bias", "norm.weight", "norm.bias"]),
    }
    assert opt.param_groups[0]["rank"] == 64 and opt.param_groups[0]["lr_ratio"] == 0.2
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters()), "every parameter moves"
    assert sum(rec.losses[-4:]) < 0.6 * sum(rec.losses[:4]), rec.losses
    summaries = [m for m in messages if "COSMOS" in m and "adamw_no_decay" in m]
    assert len(summaries) == 1, messages


@pytest.mark.parametrize(
    "config, trainer_kw, expect",  # expect: (warmup, total)
    [
        (CosmosConfig(lr=1e-2, warmup_steps=3, min_lr_ratio=0.2), {"max_steps": 10}, (3, 10)),
        # 4 batches an epoch, 2 per optimizer step, 3 epochs: estimated_stepping_batches = 6.
        (CosmosConfig(warmup_fraction=0.34, min_lr_ratio=0.0), {"max_epochs": 3, "accumulate_grad_batches": 2}, (2, 6)),
        (CosmosConfig(warmup_steps=2, max_steps=5), {"max_steps": 8}, (2, 5)),  # floor held after step 5
    ],
)
def test_schedule_matches_closed_form(config, trainer_kw, expect):
    cls = type("Scheduled", (CosmosTinyLM,), {"cosmos_config": config})
    rec = Recorder()
    trainer = _trainer([rec], **{"max_steps": -1, **trainer_kw})
    trainer.fit(_model(cls), _loader())
    warmup, total = expect
    steps = trainer.global_step
    assert len(rec.lrs) == steps
    for s, lrs in enumerate(rec.lrs):
        assert lrs == pytest.approx([config.lr * _closed_form(s, warmup, total, config.min_lr_ratio)] * 3, rel=1e-12), s
    assert rec.lrs[0][0] == pytest.approx(config.lr / warmup)
    assert rec.lrs[warmup][0] == pytest.approx(config.lr)


def test_class_level_config():
    config = CosmosConfig(lr=1e-3, lr_ratio=0.3, rank=4, gamma=0.5, weight_decay=0.0, warmup_steps=0,
                          optimizer_kwargs={"update_interval": 2, "ns_dtype": "float32"},
                          overrides={"head.weight": "cosmos"})
    cls = type("Configured", (CosmosTinyLM,), {"cosmos_config": config})
    trainer = _trainer(max_steps=2)
    trainer.fit(_model(cls), _loader())
    opt = trainer.optimizers[0]
    cosmos = opt.param_groups[0]
    assert cosmos["param_names"] == ["fc1.weight", "fc2.weight", "head.weight"]
    assert (cosmos["lr_ratio"], cosmos["rank"], cosmos["gamma"], cosmos["weight_decay"]) == (0.3, 4, 0.5, 0.0)
    assert (cosmos["update_interval"], cosmos["ns_dtype"]) == (2, "float32")
    assert opt.state[model_param(trainer, "fc1.weight")]["U"].shape == (DIM, 4)


def model_param(trainer, name):
    return dict(trainer.lightning_module.named_parameters())[name]


def test_overriding_cosmos_param_groups_changes_the_routing():
    class AllAdamW(CosmosTinyLM):
        def cosmos_param_groups(self):
            return [{"params": list(self.named_parameters()), "algorithm": "adamw", "name": "all"}]

    trainer = _trainer(max_steps=1)
    trainer.fit(_model(AllAdamW), _loader())
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["all"]


# ---------------------------------------------------------------------- injection
@pytest.mark.parametrize(
    "factory, cls, check, matrices",
    [
        (partial(torch.optim.AdamW, lr=5e-3, weight_decay=0.05), torch.optim.AdamW,
         lambda g: g[0]["weight_decay"] == 0.05 and g[2]["weight_decay"] == 0.0, "matrices"),
        (partial(MuonAdamW, lr=5e-3, momentum=0.9), MuonAdamW,
         lambda g: [x["algorithm"] for x in g] == ["muon", "adamw", "adamw"] and g[0]["momentum"] == 0.9, "muon"),
        (partial(COSMOS, lr=5e-3, rank=2), COSMOS, lambda g: g[0]["rank"] == 2, "cosmos"),
    ],
)
def test_injected_optimizer(factory, cls, check, matrices):
    model = _model(optimizer=factory)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = Recorder()
    trainer = _trainer([rec], max_steps=6)
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    assert type(opt) is cls and check(opt.param_groups)
    # The matrix group is named after what the optimizer does with it (lr-AdamW/matrices, not .../cosmos).
    assert [g["name"] for g in opt.param_groups] == [matrices, "adamw", "adamw_no_decay"]
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    # cosmos_config's schedule still applies, on the injected optimizer's own lr.
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([5e-3 * _closed_form(s, 0, 6, 0.1) for s in range(6)])


def test_injected_lr_scheduler_is_stepped_every_step():
    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    rec = Recorder()
    trainer = _trainer([rec], max_steps=5)
    trainer.fit(_model(optimizer=partial(torch.optim.AdamW, lr=1e-2), lr_scheduler=sched), _loader())
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])


# ---------------------------------------------------------------------- errors
def test_wrong_base_order_raises():
    with pytest.raises(TypeError, match="CosmosMixin must come before LightningModule"):
        class Wrong(TinyLM, CosmosMixin):
            pass
    with pytest.raises(TypeError, match="cosmos_config must be a lit_cosmos.CosmosConfig"):
        class NotAConfig(CosmosTinyLM):
            cosmos_config = {"lr": 1e-3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-3}, r"invalid CosmosConfig.lr=-0.001: must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, r"invalid CosmosConfig.weight_decay=inf"),
        ({"min_lr_ratio": 1.5}, r"invalid CosmosConfig.min_lr_ratio=1.5: must be in \[0, 1\]"),
        ({"warmup_fraction": 1.0}, r"invalid CosmosConfig.warmup_fraction=1.0"),
        ({"warmup_steps": -2}, r"invalid CosmosConfig.warmup_steps=-2"),
        ({"max_steps": 0}, r"invalid CosmosConfig.max_steps=0"),
        ({"rank": 2.5}, r"invalid CosmosConfig.rank=2.5"),
        ({"conv": "sgd"}, r"invalid CosmosConfig.conv='sgd'"),
        ({"optimizer_kwargs": {"lr": 1.0}}, r"'lr' is a CosmosConfig field"),
        ({"optimizer_kwargs": {"momentum": 0.9}}, r"'momentum' is not a COSMOS argument"),
        ({"betas": (0.9, 1.5)}, r"invalid CosmosConfig.betas=\(0.9, 1.5\): must be a pair of numbers in \[0, 1\)"),
        ({"adamw_betas": (0.9,)}, r"invalid CosmosConfig.adamw_betas=\(0.9,\)"),
        ({"head_names": "lm_head"}, r"invalid CosmosConfig.head_names='lm_head': must be a sequence"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosmosConfig(**kwargs)


@pytest.mark.parametrize(
    "config, attrs, trainer_kw, error, match",
    [
        (CosmosConfig(), {}, {"max_steps": -1, "max_epochs": -1}, ValueError,
         r"estimated_stepping_batches=inf: set Trainer\(max_steps=...\)"),
        (CosmosConfig(), {"optimizer": "adamw"}, {"max_steps": 10}, TypeError,
         r"CosmosTinyLM.optimizer = 'adamw' is neither None nor callable"),
        (CosmosConfig(), {"optimizer": lambda groups: None}, {"max_steps": 10}, TypeError,
         r"returned NoneType, not a torch Optimizer"),
        (CosmosConfig(), {"lr_scheduler": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}, {"max_steps": 10},
         TypeError, r"torch's ReduceLROnPlateau, which does not say which logged metric .* lightning.pytorch.cli.ReduceLROnPlateau"),
    ],
)
def test_bad_setup_raises_in_fit(config, attrs, trainer_kw, error, match):
    cls = type("CosmosTinyLM", (CosmosTinyLM,), {"cosmos_config": config})
    with pytest.raises(error, match=match):
        _trainer(**trainer_kw).fit(_model(cls, **attrs), _loader())


def test_total_steps_without_trainer_raises():
    with pytest.raises(ValueError, match="attach the module to a Trainer or set CosmosConfig"):
        _model().configure_optimizers()


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("optimizer", [None, partial(MuonAdamW, lr=5e-3)], ids=["cosmos", "muon_adamw"])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, optimizer):
    # The schedule's length is fixed by the config, so the 4-step first leg sees the same schedule.
    cls = type("Resumable", (CosmosTinyLM,), {"cosmos_config": CosmosConfig(warmup_steps=2, max_steps=8)})
    attrs = {"optimizer": optimizer} if optimizer else {}

    full = _model(cls, **attrs)
    _trainer(max_steps=-1, max_epochs=2).fit(full, _loader())  # 2 epochs of 4 batches

    # Stop at an epoch boundary: a run stopped by max_steps has not finished its epoch, and
    # Lightning then restarts the data (not the optimizer) differently on resume.
    first = _model(cls, **attrs)
    trainer = _trainer(max_steps=-1, max_epochs=1)
    trainer.fit(first, _loader())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _model(cls, seed=1, **attrs)  # another init: everything must come from the checkpoint
    rec = Recorder()
    trainer = _trainer([rec], max_steps=-1, max_epochs=2)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt)
    assert trainer.global_step == 8 and len(rec.lrs) == 4
    assert rec.lrs[0][0] == pytest.approx(2e-3 * _closed_form(4, 2, 8, 0.1) if optimizer is None
                                          else 5e-3 * _closed_form(4, 2, 8, 0.1))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


class PlateauLM(CosmosTinyLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", 10.0)  # never improves after epoch 1: cut after each later epoch (patience 0)
        return loss


def test_lightning_reduce_on_plateau_is_stepped_every_epoch_on_its_monitor():
    from lightning.pytorch.cli import ReduceLROnPlateau

    rec = Recorder()
    model = _model(PlateauLM, lr_scheduler=lambda opt: ReduceLROnPlateau(opt, monitor="train_loss", patience=0, factor=0.5))
    _trainer([rec], max_steps=-1, max_epochs=3).fit(model, _loader())
    per_epoch = [lrs[0] for lrs in rec.lrs[::4]]
    assert per_epoch == pytest.approx([2e-3, 2e-3, 1e-3])


def test_continuing_a_finished_run_to_more_steps_follows_the_longer_schedule(tmp_path):
    # The first run's schedule ends at its max_steps (4); the continued run asks for 8. Its own
    # schedule applies from step 5 on (as if 8 had been asked for from the start), not the floor
    # rate of the finished one, and a warning names both and the rate before and after.
    cls = type("Continued", (CosmosTinyLM,), {"cosmos_config": CosmosConfig(warmup_steps=1, min_lr_ratio=0.25)})
    trainer = _trainer(max_steps=-1, max_epochs=1)
    trainer.fit(_model(cls), _loader())
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)
    rec = Recorder()
    resumed = _trainer([rec], max_steps=-1, max_epochs=2)
    with pytest.warns(UserWarning, match=r"saved in the checkpoint \(warmup 1, cosine to 0.25 x lr at step 4\) "
                                         r"differs from this run's \(warmup 1, cosine to 0.25 x lr at step 8\): "
                                         r"this run's applies from step 5 on, at 0.708 x lr \(the checkpoint's "
                                         r"schedule gives 0.25 x lr there\)"):
        resumed.fit(_model(cls), _loader(), ckpt_path=ckpt)
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([2e-3 * _closed_form(s, 1, 8, 0.25) for s in range(4, 8)])
    # The schedule saved by the continued run is its own: continuing it again is exact.
    assert resumed.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 8


def test_a_warmup_longer_than_the_run_shrinks_with_a_warning_naming_the_setting():
    rec = Recorder()
    cls = type("Smoke", (CosmosTinyLM,), {"cosmos_config": CosmosConfig(warmup_steps=20)})
    with pytest.warns(UserWarning, match=r"CosmosConfig.warmup_steps=20 is not shorter than this run's 5 optimizer "
                                         r"steps: the LR warmup is shrunk to 2 steps"):
        _trainer([rec], max_steps=5).fit(_model(cls), _loader(batches=8))
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([2e-3 * _closed_form(s, 2, 5, 0.1) for s in range(5)])
    # A module that takes its settings under other names (a CLI config) has them named so.
    named = CosmosConfig(warmup_fraction=0.9, names={"warmup_fraction": "model.init_args.warmup_fraction"})
    with pytest.warns(UserWarning, match=r"model.init_args.warmup_fraction=0.9 \(= 1 steps\) is not shorter than "
                                         r"this run's 1 optimizer steps: the LR warmup is shrunk to 0 steps"):
        assert named.resolve_warmup(1) == 0
    with pytest.raises(ValueError, match=r"invalid model.init_args.min_lr_ratio=2: must be in \[0, 1\]"):
        CosmosConfig(min_lr_ratio=2, names={"min_lr_ratio": "model.init_args.min_lr_ratio"})
    assert named == CosmosConfig(warmup_fraction=0.9)  # names are for messages, not a setting


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda g: torch.optim.AdamW(g, lr=1e-3), {"matrices": "cosmos", "adamw": "adamw", "adamw_no_decay": "adamw"}),
        pytest.param(lambda g: MuonAdamW(g, lr=1e-3), {"muon": "muon", "adamw": "adamw", "adamw_no_decay": "adamw"},
                     marks=pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon")),
    ],
    ids=["adamw", "muon_adamw"],
)
def test_groups_are_named_after_the_injected_optimizer(make, names):
    model = _model(optimizer=make)
    trainer = _trainer(max_steps=1)
    messages = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger, old_level = rank_zero_module.log, rank_zero_module.log.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer.fit(model, _loader())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    live = {g["name"]: g["algorithm"] for g in trainer.optimizers[0].param_groups}
    assert live == names  # the optimizers' own algorithm keys are kept: MemoryMonitor reads them
    summary = next(m for m in messages if "adamw_no_decay" in m)
    assert "cosmos" not in summary.split("\n", 1)[1]


def test_an_exact_resume_does_not_warn(tmp_path):
    cls = type("Exact", (CosmosTinyLM,), {"cosmos_config": CosmosConfig(warmup_steps=1, max_steps=8)})
    trainer = _trainer(max_steps=-1, max_epochs=1)
    trainer.fit(_model(cls), _loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LR schedule restored.*")
        _trainer(max_steps=-1, max_epochs=2).fit(_model(cls), _loader(), ckpt_path=tmp_path / "half.ckpt")


# ---------------------------------------------------------------------- LightningCLI
def cosmos_optimizer(params) -> COSMOS:
    """A module-level default for the CLI (never a lambda: its init_args would leak). The return
    annotation is needed: without it jsonargparse hands the module the string 'test_mixin.cosmos_optimizer'."""
    return COSMOS(params, lr=1e-3)


def unannotated_optimizer(params):
    return COSMOS(params, lr=1e-3)


class CLITinyLM(CosmosTinyLM):
    def __init__(self, optimizer: OptimizerCallable = cosmos_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None):
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler


class CLIUnannotatedTinyLM(CosmosTinyLM):
    def __init__(self, optimizer: OptimizerCallable = unannotated_optimizer):
        super().__init__()
        self.optimizer = optimizer


class CLINoneTinyLM(CosmosTinyLM):
    def __init__(self, optimizer: Optional[OptimizerCallable] = None):
        super().__init__()
        self.optimizer = optimizer


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-cosmos"])  # LightningCLI warns about pytest's own argv


def _cli(tmp_path, model_cls, model_yaml):
    path = tmp_path / "config.yaml"
    path.write_text(
        "trainer:\n  max_steps: 2\n  accelerator: cpu\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        f"model:\n  class_path: {model_cls.__module__}.{model_cls.__qualname__}\n" + model_yaml
    )
    cli = LightningCLI(TinyLM, subclass_mode_model=True, run=False, save_config_callback=None,
                       seed_everything_default=0, args=["--config", str(path)])
    cli.trainer.fit(cli.model, _loader())
    return cli.trainer.optimizers[0], cli.trainer.lr_scheduler_configs[0].scheduler


@pytest.mark.parametrize(
    "model_yaml, cls, check",
    [
        ("", COSMOS, lambda g: g[0]["lr"] == pytest.approx(1e-3 * _closed_form(2, 0, 2, 0.1))),
        ("  init_args:\n    optimizer:\n      class_path: torch.optim.AdamW\n", torch.optim.AdamW,
         lambda g: g[0]["weight_decay"] == 0.01),  # AdamW's own default: nothing leaked from the default
        ("  init_args:\n    optimizer:\n      class_path: torch.optim.AdamW\n"
         "      init_args: {lr: 0.01, weight_decay: 0.05}\n",
         torch.optim.AdamW, lambda g: g[0]["weight_decay"] == 0.05 and g[2]["weight_decay"] == 0.0),
        ("  init_args:\n    optimizer:\n      class_path: lit_cosmos.MuonAdamW\n"
         "      init_args: {lr: 0.002, momentum: 0.9, adamw_betas: [0.9, 0.99]}\n",
         MuonAdamW, lambda g: g[0]["momentum"] == 0.9 and g[1]["betas"] == (0.9, 0.99)),
        ("  init_args:\n    optimizer:\n      class_path: lit_cosmos.COSMOS\n"
         "      init_args: {rank: 4, lr_ratio: 0.25}\n",
         COSMOS, lambda g: (g[0]["rank"], g[0]["lr_ratio"]) == (4, 0.25)),
    ],
    ids=["default", "adamw-bare", "adamw", "muon_adamw", "cosmos"],
)
def test_cli_injection(tmp_path, model_yaml, cls, check):
    opt, sched = _cli(tmp_path, CLITinyLM, model_yaml)
    assert type(opt) is cls and check(opt.param_groups)
    matrices = {COSMOS: "cosmos", MuonAdamW: "muon"}.get(cls, "matrices")
    assert [g["name"] for g in opt.param_groups] == [matrices, "adamw", "adamw_no_decay"]
    assert type(sched) is WarmupCosineLR  # the warmup-cosine LambdaLR of the mixin


def test_cli_injection_of_scheduler_and_none_default(tmp_path):
    yaml = ("  init_args:\n    lr_scheduler:\n      class_path: torch.optim.lr_scheduler.ConstantLR\n"
            "      init_args: {factor: 0.5, total_iters: 100}\n")
    opt, sched = _cli(tmp_path, CLITinyLM, yaml)
    assert type(opt) is COSMOS and type(sched) is torch.optim.lr_scheduler.ConstantLR
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    opt, _ = _cli(tmp_path, CLINoneTinyLM, "")  # None: COSMOS from cosmos_config
    assert type(opt) is COSMOS and opt.param_groups[1]["lr"] == pytest.approx(2e-3 * _closed_form(2, 0, 2, 0.1))


def test_cli_unannotated_default_function_fails_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"optimizer = '.*unannotated_optimizer' is a string.*return annotation"):
        _cli(tmp_path, CLIUnannotatedTinyLM, "")


def test_fsdp1_is_refused_with_an_explanation():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lit_cosmos.lightning.mixin import FSDP1_ERROR

    model = _model()
    model._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(RuntimeError, match=r"FSDP1 .* flattened 1-D shards.*ModelParallelStrategy"):
        model.configure_optimizers()
    assert "fsdp2.yaml" in FSDP1_ERROR
