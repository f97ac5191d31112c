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
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import litdata
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader

# Bump when the on-disk layout or the split rule changes: old caches are then ignored.
_FORMAT_VERSION = 1
_META_FILE = "meta.json"
# One optimize() item: the token stream is cut into pieces of this many tokens.
_PIECE_TOKENS = 1 << 22


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


def read_corpus(paths: Sequence[str], suffixes: Sequence[str]) -> list[tuple[str, str]]:
    """(name, text) documents from files and folders (searched recursively for ``suffixes``)."""
    docs = []
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
            text = file.read_text(encoding="utf-8", errors="replace")
            if text:
                docs.append((str(file), text))
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
    """
    env = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(cache_dir / ".litdata" / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(cache_dir / ".litdata" / "data"),
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_method = multiprocessing.get_start_method(allow_none=True)
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
    training. Written to a temporary folder and renamed at the end, so an interrupted run never
    leaves a folder that looks complete.
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

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
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
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same corpus first
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False


class TextDataModule(L.LightningDataModule):
    """Causal-LM token blocks from text (prepared here) or from ready litdata token datasets.

    Args:
        paths: text files and folders (searched recursively for ``suffixes``); ``None`` uses the
            standard library's ``pydoc_data.topics``. Ignored parts: hidden files and folders.
        block_size: tokens per model input; each sample holds ``block_size + 1`` tokens.
        batch_size: samples per batch and per process.
        val_fraction: tail fraction of the token stream held out for validation, in (0, 1).
        test_fraction: last tail fraction of the token stream held out for testing, in [0, 1),
            with ``val_fraction + test_fraction < 1``; the stream is then cut as
            ``[train | val | test]`` and ``test_dataloader``/``predict_dataloader`` serve the test
            split. 0 (default): no test split, and those loaders serve the validation split.
            Text only: with ``train_dir`` give ``test_dir`` instead.
        num_workers: DataLoader worker processes. 0 by default: reading is ~8M tokens/s in the
            main process, and workers would restart every epoch of a small corpus.
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

    Raises:
        FileNotFoundError: a path in ``paths`` does not exist.
        ValueError: an out-of-range argument, contradictory arguments, an empty corpus, or a
            ``block_size`` longer than a split (raised in ``setup``).
    """

    def __init__(
        self,
        paths: list[str] | str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str = "data",
        train_dir: str | None = None,
        val_dir: str | None = None,
        vocab_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        suffixes: tuple[str, ...] = (".txt", ".md", ".rst"),
        test_fraction: float = 0.0,
        test_dir: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(paths, (str, Path)):
            paths = [str(paths)]
        for name, value, low in (
            ("block_size", block_size, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
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
                    raise FileNotFoundError(f"data path {path!r} does not exist")
        self.paths = list(paths) if paths else None
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
        return read_corpus(self.paths, self.suffixes) if self.paths else stdlib_corpus()

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

    def train_dataloader(self) -> StreamingDataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return StreamingDataLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> StreamingDataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation
        return StreamingDataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> StreamingDataLoader | list:
        """The test split (``test_fraction > 0`` or ``test_dir``), else the validation split (then
        ``lit-cosmos test`` reports the validation loss of a checkpoint). Not shuffled."""
        if self.test_dataset is None:
            return self.val_dataloader()
        return StreamingDataLoader(self.test_dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> StreamingDataLoader | list:
        """The split ``test_dataloader`` serves, for ``lit-cosmos predict`` (next-token predictions)."""
        return self.test_dataloader()
