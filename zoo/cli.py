"""``lit-cosmos``: LightningCLI over ``zoo.lit_model.CausalLM`` and ``zoo.data.TextDataModule``.

Subcommands ``fit``, ``validate``, ``test`` and ``predict`` (``TextDataModule`` serves its test
split to ``test`` and ``predict``, or its validation split when it has none). Configs
are YAML files layered in order; precedence, lowest first: defaults, environment variables such
as ``PL_FIT__TRAINER__MAX_STEPS=100``, config files, command-line flags::

    lit-cosmos fit --config configs/quickstart.yaml
    lit-cosmos fit --config configs/models/llama-130m.yaml --config configs/optim/muon.yaml \\
        --config configs/strategy/fsdp2.yaml --trainer.max_steps 20000
    lit-cosmos fit --config configs/quickstart.yaml --print_config   # the merged config, then exit

Model and data are in subclass mode: any LightningModule / LightningDataModule can be named by
``class_path``. ``data.vocab_size`` is linked into ``model.init_args.vocab_size`` when both are
instantiated, so the embedding matches the tokenizer (a model class without a ``vocab_size``
argument therefore needs its own entry point).

Defaults added here (all replaceable in a config): a ``TensorBoardLogger`` writing under
``runs/<name>/version_<n>/`` (with ``config.yaml``, ``hparams.yaml`` and ``checkpoints/``),
a ``ModelCheckpoint`` keeping ``last.ckpt`` and a ``LearningRateMonitor``. Listing
``trainer.callbacks`` in a config replaces the two default callbacks, so list them again if you
want them. LightningCLI's top-level ``optimizer:`` / ``lr_scheduler:`` keys are disabled: they
would bypass the parameter routing and build the optimizer before FSDP2 shards the model. Choose
the optimizer with ``model.init_args.optimizer`` (``configs/optim/*.yaml``).
"""

from __future__ import annotations

import importlib
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from zoo.data import TextDataModule
from zoo.lit_model import FSDP1_ERROR, CausalLM

__all__ = ["CosmosCLI", "build_cli", "main"]

DEFAULTS: dict[str, Any] = {
    "model": {"class_path": "zoo.lit_model.CausalLM"},
    "data": {"class_path": "zoo.data.TextDataModule"},
    "trainer.logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "lit-cosmos", "default_hp_metric": False},
    },
    "trainer.callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": "link"}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ],
}


class CosmosCLI(LightningCLI):
    """LightningCLI with the vocabulary link, the defaults above and an early FSDP1 check."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.set_defaults(DEFAULTS)

    def before_instantiate_classes(self) -> None:
        # Before any class is built (and before data preparation), so the mistake costs nothing.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if _is_fsdp1(config.get("trainer", Namespace()).get("strategy")):
            raise ValueError(FSDP1_ERROR)


def _is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    if isinstance(strategy, FSDPStrategy):
        return True
    if isinstance(strategy, str):
        if strategy in StrategyRegistry:
            cls = StrategyRegistry[strategy]["strategy"]
            return isinstance(cls, type) and issubclass(cls, FSDPStrategy)
        return strategy.lower().startswith("fsdp")
    class_path = strategy.get("class_path") if isinstance(strategy, (Namespace, dict)) else None
    if isinstance(class_path, str):
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return name == "FSDPStrategy"
        return isinstance(cls, type) and issubclass(cls, FSDPStrategy)
    return False


def build_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> CosmosCLI:
    """The CLI object (``cli.model``, ``cli.datamodule``, ``cli.trainer``) after running ``args``.

    ``kwargs`` go to :class:`LightningCLI` (e.g. ``trainer_defaults``); ``run=False`` only
    parses and instantiates (then ``args`` has no subcommand).
    """
    options: dict[str, Any] = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": True},
        auto_configure_optimizers=False,
    )
    options.update(kwargs)
    return CosmosCLI(CausalLM, TextDataModule, args=args, run=run, **options)


def main(args: ArgsType = None) -> None:
    """Console entry point ``lit-cosmos`` (``args``: a list of flags, as from the command line)."""
    build_cli(args)


if __name__ == "__main__":
    main()
