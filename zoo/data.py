"""Token blocks for causal-LM training, served through litdata.

Two ways in:

1. Text (default): local files/folders, or, with nothing given, the English documentation that
   ships with every Python install (``pydoc_data.topics``, ~465 KB). ``prepare_data`` tokenizes it
   (byte-level by default), splits a fixed tail fraction off as validation (and, with
   ``test_fraction > 0``, a last tail fraction as test) and writes the splits with
   ``litdata.optimize(..., item_loader=TokensLoader())`` into
   ``<cache_dir>/<tokenizer>-<content hash>/{train,val[,test]}``. Identical content reuses that folder.
2. Already optimized litdata token datasets (``train_dir``/``val_dir``/``test_dir``, local or
   ``s3://...``), e.g. real pretraining data; nothing is prepared then and ``vocab_size`` must be given.

A batch is a LongTensor of shape ``(batch_size, block_size + 1)``: inputs ``batch[:, :-1]``,
targets ``batch[:, 1:]``. Datasets are built in ``setup`` (after the process group exists), so
every DDP rank streams its own disjoint share of the samples.

Example::

    dm = TextDataModule(block_size=128, batch_size=8)
    dm.prepare_data(); dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))   # (8, 129)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import litdata
import numpy as np
import psutil
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader

from zoo.resources import load_average, plan_workers, usable_cores

# Bump when the on-disk layout or the split rule changes: old caches are then ignored.
_FORMAT_VERSION = 1
_META_FILE = "meta.json"
# One optimize() item: the token stream is cut into pieces of this many tokens.
_PIECE_TOKENS = 1 << 22
# A NUL byte in a file's first bytes marks it as binary (git's test).
_BINARY_SNIFF_BYTES = 8192
# Temporary folder of a preparation in progress: <final name>.tmp<pid>-<host>.
_TMP_RE = re.compile(r"^(?P<final>.+)\.tmp(?P<pid>\d+)(?:-(?P<host>.*))?$")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus one end-of-text token (256): ``vocab_size = 257``.

    Lossless for any text: ``decode(encode(s)) == s``. Needs no download or training.
    """

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str, eot: bool = False) -> torch.Tensor:
        ids = torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        return torch.cat((ids, torch.tensor([self.eot_id]))) if eot else ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        ids = torch.as_tensor(ids).flatten().tolist()
        bad = [i for i in ids if not 0 <= i <= self.eot_id]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the byte vocabulary [0, {self.eot_id}]")
        # End-of-text separates documents; it has no bytes of its own.
        return bytes(i for i in ids if i != self.eot_id).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def stdlib_corpus() -> list[tuple[str, str]]:
    """The standard library's ``pydoc_data.topics``: (name, text) documents in a fixed order."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics:{key}", topics[key]) for key in sorted(topics)]


def read_corpus(
    paths: Sequence[str], suffixes: Sequence[str], allow_binary: bool = False
) -> list[tuple[str, str]]:
    """(name, text) documents from files and folders (searched recursively for ``suffixes``).

    Files are read as UTF-8. A file that looks binary (a NUL byte in its first 8 KiB, the test
    git uses; UTF-16 text looks so too) is refused unless ``allow_binary``; undecodable bytes are
    replaced by U+FFFD, with one warning giving the counts.
    """
    docs = []
    replaced: dict[str, int] = {}
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            raise FileNotFoundError(f"data path {str(path)!r} does not exist")
        for file in files:
            data = file.read_bytes()
            nul = data.find(b"\0", 0, _BINARY_SNIFF_BYTES)
            if nul >= 0 and not allow_binary:
                raise ValueError(
                    f"paths={list(paths)!r}: data file {str(file)!r} looks binary (a NUL byte at offset {nul}; UTF-16 "
                    "text looks so too: convert it to UTF-8): leave it out, or set allow_binary=true to read it "
                    "anyway (undecodable bytes become U+FFFD)"
                )
            # Universal newlines, as text-mode reading gives: the tokens (and cache names) stay as they were.
            text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
            # Each undecodable sequence became one U+FFFD; genuine U+FFFD characters are not counted.
            bad = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
            if bad:
                replaced[str(file)] = bad
            if text:
                docs.append((str(file), text))
    if replaced:
        worst = max(replaced, key=replaced.get)
        rank_zero_warn(
            f"replaced {sum(replaced.values()):,} undecodable byte sequences with U+FFFD in {len(replaced)} of "
            f"{len(docs)} files (most in {worst!r}: {replaced[worst]:,}); the text is read as UTF-8"
        )
    if not docs:
        raise ValueError(
            f"empty corpus: no non-empty text in paths={list(paths)} (folders are searched for {list(suffixes)})"
        )
    return docs


def corpus_hash(
    docs: Sequence[tuple[str, str]], tokenizer: Tokenizer, val_fraction: float, test_fraction: float = 0.0
) -> str:
    """Hash of everything the prepared tokens depend on: content, order, tokenizer, split.

    ``test_fraction`` enters the hash only when it is > 0, so that data prepared without a test
    split keeps the folder name it had before the option existed.
    """
    key = f"v{_FORMAT_VERSION}|{tokenizer.name}|{tokenizer.vocab_size}|{val_fraction!r}"
    if test_fraction > 0:
        key += f"|test={test_fraction!r}"
    h = hashlib.sha256(key.encode())
    for _, text in docs:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def _emit_tokens(piece: np.ndarray) -> Iterator[np.ndarray]:
    # Module level so that it pickles into litdata's worker processes.
    yield piece


def _to_int64(item: Any) -> torch.Tensor:
    # Stored as uint16 (half the disk of int32 for vocabularies up to 65536); models want int64.
    return torch.from_numpy(item.astype(np.int64)) if isinstance(item, np.ndarray) else item.long()


@contextmanager
def _litdata_environment(cache_dir: Path) -> Iterator[str]:
    """Point litdata's scratch folders into ``cache_dir`` and undo its global side effects.

    ``litdata.optimize`` calls ``multiprocessing.set_start_method(..., force=True)`` for the whole
    process; we restore the previous method afterwards. We ask for "fork" where it is safe (POSIX,
    CUDA not initialised): a spawned worker re-imports torch, which costs seconds for a corpus
    that is written in milliseconds.

    It also installs a SIGINT handler that ends the process with ``os._exit(0)`` and leaves it
    installed: a later Ctrl-C (in training) would exit with status 0 without saving anything, and
    one during preparation would skip the removal of the half-written folder. While it runs here,
    Ctrl-C stops litdata's workers and raises ``KeyboardInterrupt`` instead, and the previous
    handler is put back afterwards.
    """
    from litdata.processing.data_processor import DataProcessor

    env = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(cache_dir / ".litdata" / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(cache_dir / ".litdata" / "data"),
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_method = multiprocessing.get_start_method(allow_none=True)
    main_thread = threading.current_thread() is threading.main_thread()
    saved_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    saved_handler = DataProcessor.__dict__.get("_signal_handler")
    if saved_handler is not None:
        DataProcessor._signal_handler = _interrupt_handler(saved_handler, os.getpid())
    os.environ.update(env)
    fork_ok = sys.platform != "win32" and "fork" in multiprocessing.get_all_start_methods()
    try:
        yield "fork" if fork_ok and not torch.cuda.is_initialized() else "spawn"
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        multiprocessing.set_start_method(saved_method, force=True)
        if saved_handler is not None:
            DataProcessor._signal_handler = saved_handler
        if main_thread and saved_sigint is not None:
            signal.signal(signal.SIGINT, saved_sigint)


def _interrupt_handler(litdata_handler: Any, preparing_pid: int) -> Any:
    """litdata's SIGINT handler for this process: stop the workers, then raise KeyboardInterrupt.

    litdata's own handler puts a stop mark in each worker's queue and calls ``os._exit(0)``; its
    forked workers (which inherit the handler) keep it. Here the preparing process gives its
    workers a few seconds to stop, ends those still running together with their helper processes
    (downloaders, uploaders), and raises, so that the half-written folder is removed.
    """

    def handler(processor: Any, signum: int, frame: Any) -> None:
        if os.getpid() != preparing_pid:  # in a litdata worker
            return litdata_handler(processor, signum, frame)
        workers = list(getattr(processor, "workers", []))
        for queue in getattr(processor, "stop_queues", []):
            queue.put(None)
        for worker in workers:
            worker.join(5)
        for worker in workers:
            if worker.is_alive():
                try:
                    helpers = psutil.Process(worker.pid).children(recursive=True)
                except psutil.Error:
                    helpers = []
                for helper in helpers:
                    helper.terminate()
                worker.terminate()
                worker.join(5)
        raise KeyboardInterrupt

    return handler


def remove_stale_tmp_dirs(cache_dir: str | Path) -> list[Path]:
    """Remove the temporary folders that dead processes of this host left in ``cache_dir``.

    A preparation writes into ``<name>.tmp<pid>-<host>`` and renames it when complete; a process
    killed before its own cleanup (``kill -9``, a power cut) leaves the folder behind. Folders of
    live processes, and of other hosts sharing the file system, are kept. Returns the removed ones.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for path in cache_dir.iterdir():
        match = _TMP_RE.match(path.name)
        if not match or not path.is_dir() or match["host"] not in (None, host):
            continue
        if not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or sys.platform == "win32":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its folder
    return True


def prepare_corpus(
    docs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    val_fraction: float,
    cache_dir: str | Path,
    test_fraction: float = 0.0,
) -> tuple[Path, bool]:
    """Tokenize ``docs`` and write train/val(/test) token datasets; returns (folder, reused_cache).

    Each document is followed by ``eot_id``; the concatenated stream is cut as
    ``[train | val | test]``: the last ``test_fraction`` of tokens is the test split (none when
    ``test_fraction == 0``), the ``val_fraction`` before it the validation split, the rest is
    training. Written to a temporary folder ``<name>.tmp<pid>-<host>`` and renamed at the end, so an
    interrupted run never leaves a folder that looks complete; the temporary folder is removed when
    preparation fails or is interrupted, and stale ones of dead processes are removed first.
    """
    cache_dir = Path(cache_dir).expanduser().absolute()
    out = cache_dir / f"{tokenizer.name}-{corpus_hash(docs, tokenizer, val_fraction, test_fraction)}"
    if (out / _META_FILE).is_file():
        rank_zero_info(f"Reusing prepared data in {out}")
        return out, True

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    stream = np.concatenate([t for _, text in docs for t in (np.asarray(tokenizer.encode(text), dtype=dtype), eot)])
    if test_fraction > 0:
        if len(stream) < 3:
            raise ValueError(
                f"the corpus has {len(stream)} tokens: too few for a train, a val and a test split "
                f"(test_fraction={test_fraction!r})"
            )
        n_test = min(max(1, round(len(stream) * test_fraction)), len(stream) - 2)
        n_val = min(max(1, round(len(stream) * val_fraction)), len(stream) - n_test - 1)
        n_train = len(stream) - n_val - n_test
        splits = {
            "train": stream[:n_train],
            "val": stream[n_train : n_train + n_val],
            "test": stream[n_train + n_val :],
        }
    else:
        n_val = min(max(1, round(len(stream) * val_fraction)), len(stream) - 1)
        splits = {"train": stream[:-n_val], "val": stream[-n_val:]}
    rank_zero_info(
        f"Preparing {len(docs)} documents, {len(stream):,} tokens ({tokenizer.name} tokenizer) into {out}: "
        + " / ".join(f"{len(ids):,} {split}" for split, ids in splits.items()) + " tokens"
    )

    remove_stale_tmp_dirs(cache_dir)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}-{socket.gethostname()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _litdata_environment(cache_dir) as start_method:
            for split, ids in splits.items():
                pieces = [ids[i : i + _PIECE_TOKENS] for i in range(0, len(ids), _PIECE_TOKENS)]
                litdata.optimize(
                    fn=_emit_tokens,
                    inputs=pieces,
                    output_dir=str(tmp / split),
                    chunk_bytes="64MB",
                    item_loader=TokensLoader(),
                    # One worker per 16M tokens: the default corpus fits in one, and more would only add startup.
                    num_workers=max(1, min(os.cpu_count() or 1, len(pieces) // 4)),
                    keep_data_ordered=True,
                    start_method=start_method,
                    verbose=False,  # its progress bars and its banner inviting to create an account
                )
        meta = {
            "format_version": _FORMAT_VERSION,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction,
            **({"test_fraction": test_fraction} if test_fraction > 0 else {}),
            "num_documents": len(docs),
            "num_tokens": {split: int(len(ids)) for split, ids in splits.items()},
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))
    except BaseException:  # an error or Ctrl-C: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same corpus first
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False


class TextDataModule(L.LightningDataModule):
    """Causal-LM token blocks from text (prepared here) or from ready litdata token datasets.

    Args:
        paths: text files and folders (searched recursively for ``suffixes``); ``None`` uses the
            standard library's ``pydoc_data.topics``. Ignored parts: hidden files and folders. An
            empty list or an empty string is refused (it used to mean the bundled corpus or the
            current folder). Read as UTF-8: undecodable bytes become U+FFFD, with a warning giving
            the counts.
        block_size: tokens per model input; each sample holds ``block_size + 1`` tokens.
        batch_size: samples per batch and per process.
        val_fraction: tail fraction of the token stream held out for validation, in (0, 1).
        test_fraction: last tail fraction of the token stream held out for testing, in [0, 1),
            with ``val_fraction + test_fraction < 1``; the stream is then cut as
            ``[train | val | test]`` and ``test_dataloader``/``predict_dataloader`` serve the test
            split. 0 (default): no test split, and those loaders serve the validation split.
            Text only: with ``train_dir`` give ``test_dir`` instead.
        num_workers: DataLoader worker processes; ``None`` (default) chooses per run with
            :func:`zoo.resources.plan_workers`: 0 when training on CPU (reading is ~8M tokens/s in
            the main process, and a worker would take a core from the model), else the cores free
            per process minus one, at most 4.
        seed: shuffling seed of the training split (validation is not shuffled).
        cache_dir: where prepared datasets (and litdata's scratch and download caches) live.
        train_dir: an optimized litdata token dataset (local folder or URL such as ``s3://...``),
            used as is instead of ``paths``; requires ``vocab_size``.
        val_dir: its validation counterpart (optional; without it there is no validation).
        test_dir: its test counterpart (optional), streamed by ``test_dataloader`` and
            ``predict_dataloader``; without it those serve ``val_dir``.
        vocab_size: size of the vocabulary of ``train_dir``; with text it must match the tokenizer.
        tokenizer: anything with ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``decode``;
            default ``ByteTokenizer()`` (vocab 257).
        suffixes: file endings read from folders given in ``paths``.
        allow_binary: read files that look binary (a NUL byte in their first 8 KiB) instead of
            refusing them; their undecodable bytes become U+FFFD.

    Raises:
        FileNotFoundError: a path in ``paths`` does not exist.
        ValueError: an out-of-range argument, contradictory arguments, empty ``paths``; in
            ``prepare_data``, an empty corpus or a file that looks binary; in ``setup``, a
            ``block_size`` longer than a split.
    """

    def __init__(
        self,
        paths: list[str] | str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int | None = None,
        seed: int = 42,
        cache_dir: str = "data",
        train_dir: str | None = None,
        val_dir: str | None = None,
        vocab_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        suffixes: tuple[str, ...] = (".txt", ".md", ".rst"),
        test_fraction: float = 0.0,
        test_dir: str | None = None,
        allow_binary: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(paths, (str, Path)):
            paths = [str(paths)]
        if paths is not None:
            # An empty list would silently fall back to the bundled corpus, and "" is the current folder.
            if not paths or any(not str(p).strip() for p in paths):
                raise ValueError(
                    f"paths={list(paths)!r} names no file: give text files or folders, or leave paths unset "
                    "(null) for the bundled corpus"
                )
            paths = [str(p) for p in paths]
        for name, value, low in (("block_size", block_size, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 0):
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0, or null (chosen per machine)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction!r} must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r} must be < 1 "
                "(the rest of the stream is the training split)"
            )
        tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if train_dir is not None:
            if paths:
                raise ValueError(f"give either paths={paths} (text to prepare) or train_dir={train_dir!r}, not both")
            if vocab_size is None:
                raise ValueError(f"train_dir={train_dir!r} needs vocab_size (the vocabulary its tokens were made with)")
            if test_fraction > 0:
                raise ValueError(
                    f"test_fraction={test_fraction!r} splits text given in paths; with train_dir={train_dir!r} "
                    "give test_dir (an optimized test dataset) instead"
                )
        else:
            for name, value in (("val_dir", val_dir), ("test_dir", test_dir)):
                if value is not None:
                    raise ValueError(f"{name}={value!r} needs train_dir as well")
            if vocab_size is not None and vocab_size != tokenizer.vocab_size:
                raise ValueError(f"vocab_size={vocab_size} does not match the tokenizer's {tokenizer.vocab_size}")
            for path in paths or []:
                if not Path(path).exists():
                    raise FileNotFoundError(f"paths={paths!r}: data path {path!r} does not exist")
        self.paths = paths
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.tokenizer = tokenizer
        self.suffixes = tuple(suffixes)
        self.allow_binary = allow_binary
        self._vocab_size = vocab_size if vocab_size is not None else tokenizer.vocab_size
        self.data_dir: Path | None = None  # the prepared folder (text mode), known after setup
        self.num_tokens: dict[str, int] = {}  # tokens per split (text mode), known after setup
        self.train_dataset: StreamingDataset | None = None
        self.val_dataset: StreamingDataset | None = None
        self.test_dataset: StreamingDataset | None = None  # None: test/predict use val_dataset

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _docs(self) -> list[tuple[str, str]]:
        return read_corpus(self.paths, self.suffixes, self.allow_binary) if self.paths else stdlib_corpus()

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node only; setup() then finds the folder by hash.
        if self.train_dir is None:
            prepare_corpus(self._docs(), self.tokenizer, self.val_fraction, self.cache_dir, self.test_fraction)

    def setup(self, stage: str | None = None) -> None:
        # Built here, after the process group exists, so litdata shards the samples by rank.
        if self.train_dir is None:
            self._setup_prepared()
        else:
            self.train_dataset = self._dataset(self.train_dir, shuffle=True, what="train_dir")
            self.val_dataset = self._dataset(self.val_dir, shuffle=False, what="val_dir") if self.val_dir else None
            self.test_dataset = self._dataset(self.test_dir, shuffle=False, what="test_dir") if self.test_dir else None

    def _setup_prepared(self) -> None:
        docs = self._docs()
        digest = corpus_hash(docs, self.tokenizer, self.val_fraction, self.test_fraction)
        self.data_dir = self.cache_dir / f"{self.tokenizer.name}-{digest}"
        meta_file = self.data_dir / _META_FILE
        if not meta_file.is_file():
            raise RuntimeError(f"no prepared data in {self.data_dir}: call prepare_data() before setup()")
        self.num_tokens = json.loads(meta_file.read_text())["num_tokens"]
        for split, n in self.num_tokens.items():
            if n < self.block_size + 1:
                raise ValueError(
                    f"block_size={self.block_size} is longer than the data: a sample needs "
                    f"{self.block_size + 1} tokens but the {split} split has {n}; lower block_size or give more text"
                )
        self.train_dataset = self._dataset(str(self.data_dir / "train"), shuffle=True, what="train")
        self.val_dataset = self._dataset(str(self.data_dir / "val"), shuffle=False, what="val")
        self.test_dataset = None
        if "test" in self.num_tokens:
            self.test_dataset = self._dataset(str(self.data_dir / "test"), shuffle=False, what="test")

    def _dataset(self, input_dir: str, shuffle: bool, what: str) -> StreamingDataset:
        remote = "://" in input_dir
        cache = self.cache_dir / "streaming" / hashlib.sha256(input_dir.encode()).hexdigest()[:16] if remote else None
        dataset = StreamingDataset(
            input_dir,
            cache_dir=str(cache) if cache else None,
            item_loader=TokensLoader(block_size=self.block_size + 1),
            shuffle=shuffle,
            seed=self.seed,
            transform=_to_int64,
        )
        if len(dataset) == 0:
            raise ValueError(
                f"block_size={self.block_size} is longer than the data: {what} {input_dir!r} "
                f"holds no sample of {self.block_size + 1} tokens"
            )
        return dataset

    def resolved_num_workers(self) -> int:
        """``num_workers``, or when it is ``None`` the choice for this machine and accelerator."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = self.trainer
        on_cpu = trainer is None or isinstance(trainer.accelerator, CPUAccelerator)
        processes = 1 if trainer is None else max(1, trainer.world_size // max(1, trainer.num_nodes))
        return plan_workers(usable_cores(), load_average(), processes=processes, on_cpu=on_cpu)

    def _loader(self, dataset: StreamingDataset) -> StreamingDataLoader:
        # litdata's datasets give each worker and rank its own share, so their __len__ is exact: Lightning's
        # warning that an IterableDataset's __len__ may be wrong with several workers does not apply.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return StreamingDataLoader(dataset, batch_size=self.batch_size, num_workers=self.resolved_num_workers())

    def train_dataloader(self) -> StreamingDataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> StreamingDataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> StreamingDataLoader | list:
        """The test split (``test_fraction > 0`` or ``test_dir``), else the validation split (then
        ``lit-cosmos test`` reports the validation loss of a checkpoint). Not shuffled."""
        if self.test_dataset is None:
            return self.val_dataloader()
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> StreamingDataLoader | list:
        """The split ``test_dataloader`` serves, for ``lit-cosmos predict`` (next-token predictions)."""
        return self.test_dataloader()
