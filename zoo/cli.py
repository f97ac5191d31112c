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

What this CLI adds to LightningCLI, for a user's first hour:

* mistakes are reported before any data is prepared, as one line naming the key as it is typed
  (``model.init_args.optimizer.init_args.rank=-1``), with a did-you-mean for misspelt keys and no
  traceback (``LIT_COSMOS_TRACEBACK=1`` shows it); the exit status is 2;
* ``--ckpt_path`` with a config whose model or optimizer differs from the checkpoint's is an
  error naming both (LightningCLI would silently train the checkpoint's);
* a run continued from a checkpoint of ``runs/<name>/version_<n>/`` logs into that folder, and so
  do ``validate``/``test``/``predict`` of it; a run that fails before its first step leaves no
  folder behind; runs on your own text are filed under ``runs/<name>-<text>/``;
* on CPU, the intra-op thread count is chosen from the cores actually free
  (:mod:`zoo.resources`) unless ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is set;
* warnings that are noise for this package's runs are filtered (each filter names its warning).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from jsonargparse._common import debug_mode_active
from jsonargparse._formatters import DefaultHelpFormatter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_cosmos import COSMOS, MuonAdamW  # MuonAdamW imported so that --help lists it among the optimizers
from lit_cosmos.lightning.callbacks import FinalCheckpoint
from lit_cosmos.lightning.strategy import FSDP2Strategy  # noqa: F401  (registers strategy="fsdp2")
from zoo import resources
from zoo.cli_errors import component_of, did_you_mean, init_parameters, innermost, keyed_message, summarize_parse_error
from zoo.data import TextDataModule
from zoo.lit_model import FSDP1_ERROR, CausalLM

__all__ = ["CLIError", "CosmosArgumentParser", "CosmosCLI", "build_cli", "main"]

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

#: Exit status of a run stopped by a usage mistake (argparse's).
EXIT_USAGE = 2
#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Set to 1 to see the full traceback of a reported mistake.
TRACEBACK_ENV = "LIT_COSMOS_TRACEBACK"
#: Exception types that, raised before the first training step, are the user's configuration.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                MisconfigurationException)
#: Optimizers offered in --help, in this order (their arguments are read from their signatures).
_OPTIMIZERS = (COSMOS, MuonAdamW, torch.optim.AdamW)


class CLIError(ValueError):
    """A mistake in the command line or the configs: ``main`` prints its message as the last line
    of the output, without a traceback, and exits with status 2."""


# ---------------------------------------------------------------------- help and parse errors
def _class_path(cls: type) -> str:
    module = cls.__module__
    if module.startswith("lit_cosmos.") and getattr(importlib.import_module("lit_cosmos"), cls.__name__, None) is cls:
        module = "lit_cosmos"
    if module.startswith("torch.optim."):
        module = "torch.optim"
    return f"{module}.{cls.__name__}"


def epilog() -> str:
    """The end of ``--help``: where COSMOS's, the model's and the data's arguments are."""
    rows = [(_class_path(cls), ", ".join(init_parameters(cls))) for cls in _OPTIMIZERS]
    width = max(len(path) for path, _ in rows)
    optimizers = "\n".join(
        textwrap.fill(args, 100, initial_indent=f"  {path:<{width}}  ", subsequent_indent=" " * (width + 4))
        for path, args in rows
    )
    return f"""\
The options above are Lightning's Trainer's. COSMOS, the model and the data have their own help:
  lit-cosmos fit --model.help CausalLM                              model size, schedule, optimizer
  lit-cosmos fit --model.init_args.optimizer.help lit_cosmos.COSMOS  COSMOS's arguments
  lit-cosmos fit --data.help TextDataModule                         text, block size, batch size

Optimizers (model.init_args.optimizer; overlays in configs/optim/) and their arguments:
{optimizers}
Name the class, then set its arguments:
  lit-cosmos fit --config configs/quickstart.yaml --model.init_args.optimizer lit_cosmos.COSMOS \\
      --model.init_args.optimizer.rank 8

Configs: configs/quickstart.yaml (CPU, minutes), configs/debug.yaml (seconds), configs/models/*.yaml,
and overlays for optimizer, strategy and precision; docs/lightning.md explains them.
Mistakes are reported in one line; {TRACEBACK_ENV}=1 shows the traceback."""


class _HelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the epilog (argparse would re-wrap it into one paragraph)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class CosmosArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line ending the output, with a did-you-mean.

    jsonargparse prints the whole usage (about 50 lines of Trainer options) and then a nested
    report ending with the parsed namespace; here the report is cut to the key and the reason.
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or debug_mode_active() or os.environ.get(TRACEBACK_ENV):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = summarize_parse_error(message)
        unknown = re.match(r"unrecognized arguments: (--?[\w.\-]+)", text, flags=re.IGNORECASE)
        if unknown:
            options = [s for action in parser._actions for s in action.option_strings]
            text += did_you_mean(unknown.group(1).split("=")[0], options)
        not_accepted = re.search(r"does not accept option '([\w.]+)'", text)
        if not_accepted:
            text += _did_you_mean_key(not_accepted.group(1), [a.dest for a in _subcommand_parser(parser)._actions])
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"usage: {prog} [--config CONFIG] [--KEY VALUE ...]   (all options: {prog} --help)\n")
        sys.stderr.write(f"error: {text}\n")
        self.exit(EXIT_USAGE)


def _did_you_mean_key(key: str, dests: list[str]) -> str:
    """A did-you-mean for a dotted key: the whole key, else its misspelt first part (``modle.class_path``)."""
    whole = did_you_mean(key, dests)
    head, _, rest = key.partition(".")
    if whole or not rest or head in {d.split(".", 1)[0] for d in dests}:
        return whole
    close = did_you_mean(head, {d.split(".", 1)[0] for d in dests})
    return close[:-2] + f".{rest}'?" if close else ""


def _subcommand_parser(parser: Any) -> Any:
    """The parser of the subcommand being parsed, or ``parser`` itself."""
    subcommands = getattr(parser, "_subcommands_action", None)
    choices = getattr(subcommands, "_name_parser_map", None) or {}
    return next(iter(choices.values()), parser) if choices else parser


# ---------------------------------------------------------------------- the CLI
class CosmosCLI(LightningCLI):
    """LightningCLI with the vocabulary link, the defaults above, and the checks listed in the
    module docstring, all made before any data is prepared."""

    def __init__(self, *args: Any, auto_threads: bool = False, **kwargs: Any) -> None:
        raw = kwargs.get("args")
        self._raw_args = list(sys.argv[1:] if raw is None else raw) if not isinstance(raw, (dict, Namespace)) else []
        self._auto_threads = auto_threads
        self._created_log_dir: Path | None = None
        self._explicit_config: Namespace | None = None
        self._progress = _Progress()
        kwargs.setdefault("parser_class", CosmosArgumentParser)
        super().__init__(*args, **kwargs)

    # -- parser
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        if kwargs.get("description"):  # a subcommand: point at the end of the long list of Trainer options
            kwargs["description"] = kwargs["description"].rstrip() + " COSMOS's, the model's and the data's " \
                "arguments: see the end of this help."
        kwargs.setdefault("epilog", epilog())
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("prog", "lit-cosmos")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.set_defaults(DEFAULTS)

    # -- --ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Refuse a checkpoint whose model or optimizer differs from the config's.

        LightningCLI replaces the model's config with the checkpoint's hyperparameters, so a
        different size or optimizer on the command line would be ignored without a word. Here a
        value the configs or flags set explicitly must agree with the checkpoint for what shapes
        the saved state (the model class, ``model``, ``model_overrides``, ``optimizer``); other
        explicit values (``compile``, the schedule, ...) apply, with a warning naming both; values
        left at their defaults come from the checkpoint, as in LightningCLI.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return  # Lightning's keywords and remote checkpoints: Lightning reads them itself
        if not Path(ckpt_path).exists():
            raise CLIError(f"ckpt_path={ckpt_path!r} does not exist")
        saved = _checkpoint_hparams(Path(ckpt_path))
        if not saved:
            return
        saved.pop("_instantiator", None)
        saved_class = saved.pop("_class_path", None)
        given = self._explicit(subcommand).get("model")
        given = _to_plain(given) if given is not None else {}
        if isinstance(given, str):
            given = {"class_path": given}
        given_args = dict(given.get("init_args") or {})
        conflicts, notes = [], []
        given_class = given.get("class_path")
        if given_class and saved_class and _resolve(given_class) != _resolve(saved_class):
            conflicts.append(f"the model class: the checkpoint has {saved_class}, the config {given_class}")
        for key, value in given_args.items():
            if key not in saved or key == "vocab_size":  # vocab_size follows data.vocab_size
                continue
            if _same_value(key, value, saved[key]):
                continue
            text = _difference(f"model.init_args.{key}", saved[key], value)
            if key in _STATE_KEYS:
                conflicts.append(text)
            else:
                notes.append(text)
                saved[key] = value  # an explicit runtime setting applies
        if conflicts:
            raise CLIError(
                f"ckpt_path={ckpt_path!r} does not match the config, which would be silently replaced by the "
                "checkpoint's: " + "; ".join(conflicts) + ". Resume with the checkpoint's settings (its run folder "
                "holds them in config.yaml), or leave out --ckpt_path to start a new run"
            )
        if notes:
            warnings.warn(
                "continuing from the checkpoint with these settings of the config: " + "; ".join(notes), UserWarning,
                stacklevel=2,
            )
        model = {"class_path": saved_class, "init_args": saved} if saved_class else {"init_args": saved}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write("error: the hyperparameters saved in ckpt_path could not be parsed\n")
            raise

    def _explicit(self, subcommand: str) -> Namespace:
        """What the config files and flags set, without defaults (parsed once, when needed)."""
        if self._explicit_config is None:
            self._explicit_config = Namespace()
            if self._raw_args:
                try:
                    self._explicit_config = self.parser.parse_args(self._raw_args, defaults=False)
                except SystemExit:  # parsed once already, with defaults: not expected
                    pass
        return self._explicit_config.get(subcommand) or Namespace()

    # -- before anything is built
    def before_instantiate_classes(self) -> None:
        self._check_config_file_keys()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if _is_fsdp1(config.get("trainer", Namespace()).get("strategy")):
            raise CLIError(FSDP1_ERROR)
        if self.subcommand is not None:
            self._place_logs(config)
        if self._auto_threads:
            self._choose_threads(config)

    def _check_config_file_keys(self) -> None:
        """Refuse a misspelt top-level key of a ``--config`` file (``modle:``), which jsonargparse
        would silently ignore (it checks the keys under ``model:``, ``trainer:``... itself)."""
        args = self._raw_args
        position = args.index(self.subcommand) if self.subcommand in args else -1
        shown_out = {"help", "config", "print_config"}
        for index, arg in enumerate(args):
            file = args[index + 1] if arg in ("--config", "-c") and index + 1 < len(args) else None
            if arg.startswith("--config="):
                file = arg.split("=", 1)[1]
            if file is None:
                continue
            # A config given before the subcommand holds subcommands (fit: ...); after it, that subcommand's keys.
            parser = self._parser(self.subcommand if index > position else None)
            known = {action.dest.split(".", 1)[0] for action in parser._actions} - {"subcommand"}
            if index < position:
                known |= set(self.subcommands())
            try:
                content = yaml.safe_load(Path(file).read_text())
            except (OSError, yaml.YAMLError):
                continue  # jsonargparse has reported what it could not read
            for key in content if isinstance(content, dict) else ():
                if key not in known:
                    listed = ", ".join(sorted(known - shown_out))
                    raise CLIError(f"{file}: unknown top-level key {key!r}{did_you_mean(str(key), known)} "
                                   f"(the keys are {listed})")

    def _place_logs(self, config: Namespace) -> None:
        """Point the logger of a continued or evaluated run at the checkpoint's run folder, and
        file runs on the user's own text under their own name."""
        logger = config.get("trainer", Namespace()).get("logger")
        if not isinstance(logger, Namespace) or not _is_folder_logger(logger.get("class_path")):
            return
        init = logger.get("init_args") or Namespace()
        if init.get("save_dir") is None or init.get("name") is None:
            return
        name_given = self._flag_given("trainer.logger", "name")
        data = config.get("data", Namespace())
        data_args = data.get("init_args") if isinstance(data, Namespace) else None
        tag = _data_tag(data_args) if data_args is not None else None
        if tag and not name_given and tag not in str(init.name):
            init.name = f"{init.name}-{tag}"
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and init.get("version") is None:
            # <save_dir>/<name>/<version>/checkpoints/<file>: continue or evaluate the run in its own folder.
            run_dir = Path(ckpt_path).resolve().parent.parent
            same_tree = run_dir.parent.parent == Path(init.save_dir).resolve()
            if same_tree and Path(ckpt_path).resolve().parent.name == "checkpoints" and (
                run_dir.parent.name == str(init.name) or not name_given
            ):
                init.name, init.version = run_dir.parent.name, run_dir.name
                checkpoints = re.escape(str(Path(init.save_dir) / init.name / init.version / "checkpoints"))
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {checkpoints} exists and is not empty")
        if self.subcommand != "fit":
            # Keep the run's own config.yaml; this evaluation's config sits beside it.
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{self.subcommand}-config.yaml"}
            # An evaluation needs no training callbacks; Lightning's reminder to pass them is for resuming a fit.
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")

    def _flag_given(self, prefix: str, name: str) -> bool:
        """Whether a command-line flag (not a config file) sets ``<prefix>...<name>``."""
        for arg in self._raw_args:
            key = arg.split("=", 1)[0]
            if key.startswith(f"--{prefix}") and key.endswith(f".{name}"):
                return True
        return False

    def _choose_threads(self, config: Namespace) -> None:
        trainer = config.get("trainer", Namespace())
        if not _runs_on_cpu(trainer.get("accelerator")):
            return
        chosen_by = resources.threads_set_by_user()
        if chosen_by:
            rank_zero_info(f"CPU threads: {torch.get_num_threads()} ({chosen_by}={os.environ[chosen_by]})")
            return
        processes = _local_processes(trainer.get("devices"))
        cores, load = resources.usable_cores(), resources.load_average()
        threads = resources.plan_threads(cores, load, processes=processes)
        torch.set_num_threads(threads)
        # Processes started from here (DDP ranks, data workers) take the same decision as their own.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        rank_zero_info(
            f"CPU threads: {threads} per process ({cores} cores, load {load:.1f}, {processes} process"
            f"{'es' if processes > 1 else ''}); set OMP_NUM_THREADS to choose"
        )

    # -- building
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except CLIError:
            raise
        except _USER_ERRORS as err:
            raise CLIError(_user_message(err)) from err
        self._check_before_run()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        callbacks = [*callbacks, self._progress]
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if not any(isinstance(c, FinalCheckpoint) for c in configured):
            callbacks.append(FinalCheckpoint())  # every run ends with its last step in last.ckpt
        trainer = super()._instantiate_trainer(config, callbacks)
        # Only the launching process (rank 0) creates the run folder; a launched rank must not pick a version.
        launched = os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None and not launched else None
        if log_dir is not None and not Path(log_dir).exists():
            self._created_log_dir = Path(log_dir)
        return trainer

    def _check_before_run(self) -> None:
        """Checks that need the built objects but no data: the optimizer's arguments, the block size."""
        model, data = self.model, self.datamodule
        if self.subcommand in (None, "fit"):
            make = getattr(model, "optimizer", None)
            if callable(make) and not isinstance(make, torch.nn.Module):
                try:
                    make(_probe_param_groups())
                except _USER_ERRORS as err:
                    raise CLIError(_optimizer_message(self._optimizer_config(), err)) from err
        check = getattr(model, "check_datamodule", None)
        if callable(check) and data is not None:
            try:
                check(data)
            except ValueError as err:
                raise CLIError(str(err)) from err

    def _optimizer_config(self) -> Any:
        model = self.config[self.subcommand]["model"] if self.subcommand else self.config["model"]
        return (model.get("init_args") or Namespace()).get("optimizer")

    # -- running
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            self._remove_empty_run()
            if isinstance(err, _USER_ERRORS) and not self._progress.trained and not os.environ.get(TRACEBACK_ENV):
                raise CLIError(_user_message(err)) from err
            raise

    def _remove_empty_run(self) -> None:
        """A run that failed before its first step leaves no version folder (it holds only the
        saved config and an empty event file)."""
        log_dir = self._created_log_dir
        if log_dir is None or self._progress.trained or not self.trainer.is_global_zero:
            return
        if log_dir.is_dir() and not any(p.suffix == ".ckpt" for p in log_dir.rglob("*")):
            shutil.rmtree(log_dir, ignore_errors=True)
        # runs/<name>/ and runs/ too, when this run was their first
        save_dir = getattr(self.trainer.logger, "save_dir", None)
        top = Path(save_dir).resolve() if save_dir else log_dir.parent.resolve()
        parent = log_dir.parent.resolve()
        while parent.is_dir() and not any(parent.iterdir()) and (parent == top or top in parent.parents):
            parent.rmdir()
            parent = parent.parent


class _Progress(pl.Callback):
    """Whether the run took a training step (a failure after that is not a configuration mistake)."""

    def __init__(self) -> None:
        self.trained = False

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.trained = True


# ---------------------------------------------------------------------- helpers
#: CausalLM arguments that decide the shape of the saved state: a checkpoint must agree on them.
_STATE_KEYS = frozenset({"model", "model_overrides", "optimizer"})


def _checkpoint_hparams(path: Path) -> dict[str, Any] | None:
    """The hyperparameters saved in a checkpoint file, or in a distributed checkpoint's ``meta.pt``."""
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or pickled objects: Lightning reports it when it loads it
        return None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return dict(hparams) if hparams else None


def _to_plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _to_plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _resolve(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def _same_value(key: str, given: Any, saved: Any) -> bool:
    given, saved = _to_plain(given), _to_plain(saved)
    if key != "optimizer":
        return given == saved
    # An optimizer is a class path (or a function's import path) plus the init_args given.
    if isinstance(given, str) or isinstance(saved, str):
        same_class = _resolve(_class_of(given)) == _resolve(_class_of(saved))
        return same_class and not (isinstance(given, dict) and given.get("init_args"))
    if _resolve(given.get("class_path", "")) != _resolve(saved.get("class_path", "")):
        return False
    cls = _resolve(saved["class_path"])
    defaults = {}
    if isinstance(cls, type):
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    saved_args = {**defaults, **(saved.get("init_args") or {})}
    for arg, value in (given.get("init_args") or {}).items():
        if _to_plain(saved_args.get(arg, object())) != value and not _numbers_equal(saved_args.get(arg), value):
            return False
    return True


def _class_of(value: Any) -> Any:
    """The class path of ``{class_path: ..., init_args: ...}``, or the value itself (an import path)."""
    return value.get("class_path") if isinstance(value, dict) else value


def _numbers_equal(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b))
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _difference(key: str, saved: Any, given: Any) -> str:
    """``"<key>: the checkpoint has X, the config Y"``; for one optimizer class, only the arguments that differ."""
    saved, given = _to_plain(saved), _to_plain(given)
    if isinstance(saved, dict) and isinstance(given, dict) and _resolve(saved.get("class_path", "")) == _resolve(
        given.get("class_path", "")
    ):
        saved_args = saved.get("init_args") or {}
        parts = [
            f"{key}.init_args.{arg}: the checkpoint has {saved_args.get(arg, '(its default)')!r}, the config {value!r}"
            for arg, value in (given.get("init_args") or {}).items()
            if not _numbers_equal(saved_args.get(arg), value) and saved_args.get(arg, object()) != value
        ]
        if parts:
            return "; ".join(parts)
    if isinstance(saved, dict) or isinstance(given, dict):
        return f"{key}: the checkpoint has {_class_of(saved)}, the config {_class_of(given)}"
    return f"{key}: the checkpoint has {_show(saved)}, the config {_show(given)}"


def _show(value: Any) -> str:
    value = _to_plain(value)
    if isinstance(value, dict) and "class_path" in value:
        args = value.get("init_args") or {}
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return f"{value['class_path']}({inner})"
    return repr(value)


def _is_folder_logger(class_path: Any) -> bool:
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] in ("TensorBoardLogger", "CSVLogger")


def _data_tag(data_args: Namespace) -> str | None:
    """A short name for the user's own data (first text path or token dataset), for the run folder."""
    paths = data_args.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    source = (paths[0] if paths else None) or data_args.get("train_dir")
    if not source:
        return None
    source = str(source).rstrip("/")
    if data_args.get("train_dir") and not paths:
        source = source.rsplit("/", 1)[0] if source.endswith(("/train", "/training")) else source
    stem = Path(source.split("://", 1)[-1]).stem or "data"
    return re.sub(r"[^\w.-]+", "_", stem)[:40]


def _runs_on_cpu(accelerator: Any) -> bool:
    if isinstance(accelerator, str):
        if accelerator == "cpu":
            return True
        if accelerator != "auto":
            return False
    elif accelerator is not None:
        return type(accelerator).__name__ == "CPUAccelerator"
    return not (torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))


def _local_processes(devices: Any) -> int:
    if isinstance(devices, int):
        return max(1, devices) if devices > 0 else resources.usable_cores()
    if isinstance(devices, str):
        if devices.strip().isdigit():
            return max(1, int(devices))
        if devices.strip() == "-1":
            return resources.usable_cores()
        return max(1, len([d for d in devices.split(",") if d.strip()])) if "," in devices else 1
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    return 1


def _probe_param_groups() -> list[dict[str, Any]]:
    """The param groups the mixin routes, for a 3-layer toy module: enough for an optimizer's
    constructor to check its arguments before the real model and data exist."""
    from lit_cosmos import cosmos_param_groups

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

    return cosmos_param_groups(Probe())


def _optimizer_message(optimizer: Any, err: BaseException) -> str:
    class_path = optimizer.get("class_path") if isinstance(optimizer, Namespace) else optimizer
    return keyed_message("model.init_args.optimizer", class_path or "the optimizer", str(err))


def _user_message(err: BaseException) -> str:
    """One line for an exception raised while building or starting the run."""
    if isinstance(err, CLIError):
        return str(err)
    inner = innermost(err)
    found = component_of(inner)
    message = str(inner).strip() or type(inner).__name__
    if isinstance(inner, KeyError):
        message = f"KeyError: {message}"
    if found is not None:
        section, cls = found
        return keyed_message(section, cls, message)
    return message


def _is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    if isinstance(strategy, FSDPStrategy):
        return True
    if isinstance(strategy, str):
        if strategy in StrategyRegistry:
            cls = StrategyRegistry[strategy]["strategy"]
            return isinstance(cls, type) and issubclass(cls, FSDPStrategy)
        return strategy.lower().startswith("fsdp") and not strategy.lower().startswith("fsdp2")
    class_path = strategy.get("class_path") if isinstance(strategy, (Namespace, dict)) else None
    if isinstance(class_path, str):
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return name == "FSDPStrategy"
        return isinstance(cls, type) and issubclass(cls, FSDPStrategy)
    return False


# ---------------------------------------------------------------------- noise
class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)


_QUIETED = False


def quiet_known_noise() -> None:
    """Filter messages that say nothing about a ``lit-cosmos`` run, each by its own text.

    * Lightning's tip to install litlogger, printed by every Trainer;
    * Lightning 2.6's own use of torch's deprecated ``LeafSpec`` (a message for Lightning's authors).

    ``TextDataModule`` filters the warning about ``__len__`` of its litdata datasets itself.
    """
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    from lightning_utilities.core import rank_zero

    rank_zero.log.addFilter(_DropMessages("try installing [litlogger]"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# ---------------------------------------------------------------------- entry points
def build_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> CosmosCLI:
    """The CLI object (``cli.model``, ``cli.datamodule``, ``cli.trainer``) after running ``args``.

    ``kwargs`` go to :class:`LightningCLI` (e.g. ``trainer_defaults``) or :class:`CosmosCLI`
    (``auto_threads=True`` picks the CPU thread count, as the console command does); ``run=False``
    only parses and instantiates (then ``args`` has no subcommand). Mistakes raise
    :class:`CLIError` (a ``ValueError``) with the one-line message ``main`` prints.
    """
    quiet_known_noise()
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
    """Console entry point ``lit-cosmos`` (``args``: a list of flags, as from the command line).

    Exit status: 0 done, 2 a mistake in the arguments (one line on stderr), 130 stopped by Ctrl-C
    (after saving the last checkpoint).
    """
    try:
        cli = build_cli(args, auto_threads=True)
    except CLIError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        sys.stdout.flush()
        sys.stderr.write(f"error: {err}\n")
        sys.exit(EXIT_USAGE)
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and any(getattr(cb, "interrupted", False) for cb in trainer.callbacks
                                   if isinstance(cb, FinalCheckpoint)):
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
