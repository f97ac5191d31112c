"""One-line messages for the mistakes ``lit-cosmos`` users make, naming the key they typed.

jsonargparse reports a bad or misspelt key inside a class's ``init_args`` as a nested "does not
validate against any of the Union subtypes" report that ends with a dump of the whole namespace,
and an exception raised by a class's ``__init__`` arrives wrapped in that report. These helpers
turn both into one line such as::

    model.init_args.optimizer.init_args.rnak: lit_cosmos.COSMOS has no argument 'rnak'; did you mean 'rank'?
    data.init_args.paths=['/no/such/dir']: data path '/no/such/dir' does not exist

They only read messages and tracebacks; nothing here changes what is parsed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from types import TracebackType
from typing import Any

__all__ = ["component_of", "did_you_mean", "innermost", "keyed_message", "summarize_parse_error"]

_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"class_path[= ]'([\w.]+)'")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NOISE = re.compile(
    r"^\s*(-\s*)?(Given value( type)?:|Subtypes:|Errors:|Does not validate against any of the Union subtypes"
    r"|Expected a <class 'NoneType'>)"
)


def did_you_mean(word: str, choices: Any, n: int = 1) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def init_parameters(class_path_or_type: Any) -> list[str]:
    """The keyword parameters of a class's ``__init__`` (a class path or a class); ``[]`` if unknown."""
    cls = class_path_or_type
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return []
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "params"]


def _key_path(parser_keys: list[str], leaf: str | None = None) -> str:
    # Every nested "Parser key" is the init_args of a class given by class_path one level up.
    path = ".init_args.".join(parser_keys)
    return f"{path}.init_args.{leaf}" if leaf else path


def summarize_parse_error(message: str) -> str:
    """One line for a jsonargparse error message: the key path, the reason, and a did-you-mean.

    Unknown layouts come back with the noise lines (subtypes, the value dump) removed.
    """
    keys = _PARSER_KEY.findall(message)
    unknown = _NOT_ACCEPTED.search(message)
    if unknown:
        word = unknown.group(1).rsplit(".", 1)[-1]
        # The class that refused the key: the last class_path named before the end of the refusing line.
        end = message.find("\n", unknown.end())
        classes = _CLASS_PATH.findall(message[: len(message) if end < 0 else end])
        cls = classes[-1] if classes else None
        params = init_parameters(cls) if cls else []
        where = _key_path(keys, word) if keys else word
        owner = cls if cls else "this class"
        known = f" (its arguments: {', '.join(params)})" if params and not did_you_mean(word, params) else ""
        return f"{where}: {owner} has no argument {word!r}{did_you_mean(word, params)}{known}"
    missing = _NO_ATTRIBUTE.search(message)
    if missing:
        module, name = missing.groups()
        try:
            names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
        except ImportError:
            names = []
        where = f"{_key_path(keys)}: " if keys else ""
        return f"{where}{module} has no {name!r}{did_you_mean(name, names)}"
    lines = [line.strip() for line in message.splitlines() if line.strip() and not _NOISE.match(line)]
    if keys and lines:
        reason = lines[-1]
        reason = re.sub(r"^Type .*? expects .*?: ", "", reason)
        reason = re.sub(r"\. Got value: .*$", "", reason)
        return f"{_key_path(keys)}: {reason.lstrip('- ')}"
    return " ".join(lines) if lines else message.strip()


def innermost(exc: BaseException) -> BaseException:
    """The exception at the end of the ``raise ... from`` chain (jsonargparse wraps the real one)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def component_of(exc: BaseException) -> tuple[str, type] | None:
    """``(config section, class)`` of the LightningModule, DataModule, callback, logger, strategy or
    Trainer that raised ``exc``, found in its traceback: the object whose ``__init__`` raised it,
    else the innermost one whose method (``prepare_data``, ``setup``...) did; else ``None``."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.strategies import Strategy

    sections = (
        (pl.LightningModule, "model"),
        (pl.LightningDataModule, "data"),
        (pl.Callback, "trainer.callbacks"),
        (Logger, "trainer.logger"),
        (Strategy, "trainer.strategy"),
        (pl.Trainer, "trainer"),
    )
    in_init, in_method = None, None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        for base, section in sections:
            if obj is not None and isinstance(obj, base):
                if frame.f_code.co_name == "__init__" and in_init is None:
                    in_init = (section, type(obj))
                elif base is not pl.Trainer:
                    in_method = (section, type(obj))
                break
        tb = tb.tb_next
    return in_init or in_method


def keyed_message(section: str, cls: Any, message: str) -> str:
    """``message`` of an error raised by ``cls`` (configured at ``section``), naming the full keys.

    Every ``name=`` of one of ``cls``'s arguments becomes ``<section>.init_args.name=``
    (``"block_size=0 must be >= 1"`` under ``data``: ``"data.init_args.block_size=0 must be >= 1"``;
    under ``trainer`` the arguments are ``trainer.name``). A message that names none of them is
    prefixed with the section and the class, unless it names a key of the section already.
    """
    message = message.strip()
    args_prefix = section if section == "trainer" else f"{section}.init_args"
    params = set(init_parameters(cls))
    count = 0

    def qualify(match: re.Match) -> str:
        nonlocal count
        if match.group(1) not in params:
            return match.group(0)
        count += 1
        return f"{args_prefix}.{match.group(1)}="

    keyed = re.sub(r"(?<![\w.])(\w+)=", qualify, message)
    if count or re.search(rf"(?<![\w.]){re.escape(section)}\.", message):
        return keyed
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return f"{section} ({name}): {message}"
