"""TextDataModule and ByteTokenizer: content, split, cache, rank sharding and error messages."""

import hashlib
import multiprocessing
import os
import random
import string

import litdata
import pytest
import torch
from litdata import StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from litdata.utilities.env import _DistributedEnv

from zoo.data import (
    ByteTokenizer,
    TextDataModule,
    corpus_hash,
    prepare_corpus,
    read_corpus,
    remove_stale_tmp_dirs,
    stdlib_corpus,
)

BLOCK = 15  # samples hold BLOCK + 1 = 16 tokens


def write_corpus(folder, seed=0):
    """Random letters: every 16-token block is unique, so samples can be identified by content."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    for i, rel in enumerate(["a.txt", "b.md", "sub/c.txt", "sub/d.rst"]):
        words = ("".join(rng.choices(string.ascii_letters, k=rng.randint(3, 9))) for _ in range(600 + 100 * i))
        (folder / rel).write_text(" ".join(words) + " é ✓ 日本\n", encoding="utf-8")
    (folder / "skipped.bin").write_bytes(b"\x00\x01 not text")
    (folder / ".hidden.txt").write_text("hidden files are not read")
    return folder


def expected_stream(folder):
    tok = ByteTokenizer()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".md", ".rst") and not p.name.startswith("."))
    return torch.cat([tok.encode(p.read_text(encoding="utf-8"), eot=True) for p in files])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    dm = TextDataModule(paths=[str(corpus)], block_size=BLOCK, batch_size=4, val_fraction=0.1,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def prepared_test(corpus, tmp_path_factory):
    """The same corpus cut as [train | val | test] (10% val, 15% test)."""
    dm = TextDataModule(paths=[str(corpus)], block_size=BLOCK, batch_size=4, val_fraction=0.1, test_fraction=0.15,
                        cache_dir=str(tmp_path_factory.mktemp("cache_test")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def samples(loader):
    return [tuple(row.tolist()) for batch in loader for row in batch]


def split_tokens(folder, n):
    """All ``n`` tokens of a prepared split, in stored order: one sample as long as the split."""
    dataset = StreamingDataset(str(folder), item_loader=TokensLoader(block_size=n), shuffle=False)
    assert len(dataset) == 1
    return torch.as_tensor(dataset[0]).long()


@pytest.mark.parametrize("text", ["", "hello world", "héllo wörld ✓ 日本語 🚀\n\ttab", "\x00\x7f" + "ß" * 3])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with_eot = tok.encode(text, eot=True)
    assert with_eot[-1].item() == tok.eot_id == 256 and tok.decode(with_eot) == text
    assert tok.decode(with_eot.tolist() + ids.tolist()) == text + text


def test_byte_tokenizer_rejects_out_of_vocabulary_ids():
    with pytest.raises(ValueError, match=r"token ids \[257\] are outside the byte vocabulary \[0, 256\]"):
        ByteTokenizer().decode([65, 257])


def test_default_vocab_size_is_byte_level():
    assert TextDataModule().vocab_size == ByteTokenizer.vocab_size == 257
    assert TextDataModule(train_dir="s3://bucket/tokens", vocab_size=32000).vocab_size == 32000


def test_read_corpus_is_sorted_and_filtered(corpus):
    names = [os.path.relpath(name, corpus) for name, _ in read_corpus([str(corpus)], (".txt", ".md", ".rst"))]
    assert names == ["a.txt", "b.md", "sub/c.txt", "sub/d.rst"]
    # A file named explicitly is read whatever its suffix, once it is accepted as binary.
    binary = str(corpus / "skipped.bin")
    assert [name for name, _ in read_corpus([binary], (".txt",), allow_binary=True)] == [binary]


def test_splits_add_up_and_hold_the_stream_in_order(prepared, corpus):
    stream = expected_stream(corpus)
    n_train, n_val = prepared.num_tokens["train"], prepared.num_tokens["val"]
    assert n_train + n_val == len(stream)
    assert n_val == round(0.1 * len(stream))
    # Validation is unshuffled: its samples are the stream's tail, cut into consecutive blocks.
    val = torch.tensor(samples(prepared.val_dataloader()))
    assert val.shape == (n_val // (BLOCK + 1), BLOCK + 1)
    torch.testing.assert_close(val.flatten(), stream[n_train : n_train + val.numel()])
    # Training is shuffled: the same blocks of the head of the stream, in another order.
    train = samples(prepared.train_dataloader())
    blocks = stream[: n_train // (BLOCK + 1) * (BLOCK + 1)].view(-1, BLOCK + 1)
    assert sorted(train) == sorted(tuple(b.tolist()) for b in blocks)
    assert train != [tuple(b.tolist()) for b in blocks]


def test_default_split_keeps_the_old_cache_name(prepared, corpus):
    # The hash formula from before test_fraction existed, spelled out: caches prepared then stay valid.
    old = hashlib.sha256(b"v1|byte|257|0.1")
    for _, text in read_corpus([str(corpus)], (".txt", ".md", ".rst")):
        data = text.encode("utf-8")
        old.update(len(data).to_bytes(8, "little") + data)
    assert prepared.data_dir.name == f"byte-{old.hexdigest()[:16]}"
    # Frozen with the code of commit b96ca6b (before test_fraction): corpus_hash(docs, ByteTokenizer(), 0.05).
    docs, tok = [("doc", "hello world"), ("doc2", "héllo ✓")], ByteTokenizer()
    assert corpus_hash(docs, tok, 0.05) == corpus_hash(docs, tok, 0.05, 0.0) == "1e0cf86dcada938b"
    assert corpus_hash(docs, tok, 0.05, 0.05) != "1e0cf86dcada938b"
    # No test split: two splits on disk, and test/predict serve the validation split.
    assert set(prepared.num_tokens) == {"train", "val"} and not (prepared.data_dir / "test").exists()
    assert "test_fraction" not in (prepared.data_dir / "meta.json").read_text()
    assert prepared.test_dataset is None
    val = samples(prepared.val_dataloader())
    assert samples(prepared.test_dataloader()) == samples(prepared.predict_dataloader()) == val


def test_test_split_is_the_tail_after_val(prepared_test, prepared, corpus):
    stream = expected_stream(corpus)
    n = prepared_test.num_tokens
    assert list(n) == ["train", "val", "test"] and sum(n.values()) == len(stream)
    assert n["test"] == round(0.15 * len(stream)) and n["val"] == round(0.1 * len(stream))
    assert prepared_test.data_dir != prepared.data_dir  # its own cache folder
    # Read back whole, the three splits are the stream cut in order: disjoint, contiguous, complete.
    parts = [split_tokens(prepared_test.data_dir / split, n[split]) for split in ("train", "val", "test")]
    torch.testing.assert_close(torch.cat(parts), stream)
    # The loaders serve consecutive unshuffled blocks of val and of test, shuffled blocks of train.
    start = {"train": 0, "val": n["train"], "test": n["train"] + n["val"]}
    for split, loader in (("val", prepared_test.val_dataloader()), ("test", prepared_test.test_dataloader()),
                          ("predict", prepared_test.predict_dataloader())):
        got = torch.tensor(samples(loader))
        split = "test" if split == "predict" else split
        assert got.shape == (n[split] // (BLOCK + 1), BLOCK + 1)
        torch.testing.assert_close(got.flatten(), stream[start[split] : start[split] + got.numel()])
    assert not set(samples(prepared_test.test_dataloader())) & set(samples(prepared_test.val_dataloader()))
    blocks = stream[: n["train"] // (BLOCK + 1) * (BLOCK + 1)].view(-1, BLOCK + 1)
    assert sorted(samples(prepared_test.train_dataloader())) == sorted(tuple(b.tolist()) for b in blocks)


def test_batches_are_int64_blocks(prepared):
    batch = next(iter(prepared.train_dataloader()))
    assert batch.shape == (4, BLOCK + 1) and batch.dtype == torch.int64
    assert int(batch.max()) < prepared.vocab_size


def test_preparation_is_deterministic(prepared, corpus, tmp_path):
    again = TextDataModule(paths=[str(corpus)], block_size=BLOCK, val_fraction=0.1, cache_dir=str(tmp_path))
    again.prepare_data()
    again.setup("fit")
    assert again.data_dir.name == prepared.data_dir.name  # same content hash
    for split in ("train", "val"):
        for file in sorted(os.listdir(prepared.data_dir / split)):
            if file.endswith(".bin"):
                assert (again.data_dir / split / file).read_bytes() == (prepared.data_dir / split / file).read_bytes()
    assert samples(again.train_dataloader()) == samples(prepared.train_dataloader())  # same seed, same order


def test_second_prepare_reuses_the_cache(prepared, corpus, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("optimize() ran although the data is prepared")

    monkeypatch.setattr(litdata, "optimize", fail)
    cache = prepared.cache_dir
    stamps = {p: p.stat().st_mtime_ns for p in prepared.data_dir.rglob("*")}
    dm = TextDataModule(paths=[str(corpus)], block_size=BLOCK, val_fraction=0.1, cache_dir=str(cache))
    dm.prepare_data()
    _, reused = prepare_corpus(read_corpus([str(corpus)], dm.suffixes), dm.tokenizer, 0.1, cache)
    assert reused
    assert stamps == {p: p.stat().st_mtime_ns for p in prepared.data_dir.rglob("*")}

    # Different content or a different split is a different dataset.
    changed = write_corpus(tmp_path / "changed", seed=1)
    with pytest.raises(AssertionError, match="optimize"):
        TextDataModule(paths=[str(changed)], cache_dir=str(cache)).prepare_data()
    with pytest.raises(AssertionError, match="optimize"):
        TextDataModule(paths=[str(corpus)], val_fraction=0.2, cache_dir=str(cache)).prepare_data()
    with pytest.raises(AssertionError, match="optimize"):
        TextDataModule(paths=[str(corpus)], val_fraction=0.1, test_fraction=0.1, cache_dir=str(cache)).prepare_data()


def test_two_ranks_read_disjoint_samples(prepared, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(2, r, 1)))
        prepared.setup("fit")
        per_rank.append(samples(prepared.train_dataloader()))
    monkeypatch.undo()
    prepared.setup("fit")
    n_samples = prepared.num_tokens["train"] // (BLOCK + 1)
    # Equal shares (litdata drops the remainder so that every rank runs the same number of full batches).
    assert len(per_rank[0]) == len(per_rank[1])
    assert n_samples // 2 - prepared.batch_size < len(per_rank[0]) <= n_samples // 2
    assert not set(per_rank[0]) & set(per_rank[1])


def test_default_corpus_is_the_stdlib_documentation(tmp_path):
    docs = stdlib_corpus()
    assert len(docs) > 50 and sum(len(t) for _, t in docs) > 400_000
    dm = TextDataModule(block_size=64, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert sum(dm.num_tokens.values()) == sum(len(t.encode("utf-8")) + 1 for _, t in docs)
    text = ByteTokenizer().decode(next(iter(dm.val_dataloader()))[0])
    assert len(text) > 0


def test_prepare_leaves_process_state_as_it_found_it(corpus, tmp_path):
    before = multiprocessing.get_start_method(allow_none=True)
    env = {k: os.environ.get(k) for k in ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")}
    TextDataModule(paths=[str(corpus / "a.txt")], cache_dir=str(tmp_path)).prepare_data()
    assert multiprocessing.get_start_method(allow_none=True) == before
    assert env == {k: os.environ.get(k) for k in env}
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] and not list(tmp_path.glob("*.tmp*"))


def test_optimized_dataset_dir(prepared):
    dm = TextDataModule(train_dir=str(prepared.data_dir / "train"), val_dir=str(prepared.data_dir / "val"),
                        vocab_size=257, block_size=BLOCK, batch_size=4)
    dm.prepare_data()  # nothing to prepare
    dm.setup("fit")
    assert sorted(samples(dm.train_dataloader())) == sorted(samples(prepared.train_dataloader()))
    assert samples(dm.val_dataloader()) == samples(prepared.val_dataloader())
    assert samples(dm.test_dataloader()) == samples(prepared.val_dataloader())  # no test_dir: val
    no_val = TextDataModule(train_dir=str(prepared.data_dir / "train"), vocab_size=257, block_size=BLOCK)
    no_val.setup("fit")
    assert no_val.val_dataloader() == [] and no_val.test_dataloader() == []


def test_optimized_test_dir(prepared_test):
    folder = prepared_test.data_dir
    dm = TextDataModule(train_dir=str(folder / "train"), val_dir=str(folder / "val"), test_dir=str(folder / "test"),
                        vocab_size=257, block_size=BLOCK, batch_size=4)
    dm.setup("test")
    test = samples(dm.test_dataloader())
    assert test == samples(prepared_test.test_dataloader()) == samples(dm.predict_dataloader())
    assert samples(dm.val_dataloader()) == samples(prepared_test.val_dataloader()) != test
    too_long = TextDataModule(train_dir=str(folder / "train"), test_dir=str(folder / "test"), vocab_size=257,
                              block_size=prepared_test.num_tokens["test"])
    with pytest.raises(ValueError, match=r"block_size=\d+ is longer than the data: test_dir '.*test'"):
        too_long.setup("test")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(paths=["/no/such/file.txt"]), FileNotFoundError,
         r"paths=\['/no/such/file.txt'\]: data path '/no/such/file.txt' does not exist"),
        (dict(paths=[]), ValueError, r"paths=\[\] names no file: give text files or folders, or leave paths unset"),
        (dict(paths=""), ValueError, r"paths=\[''\] names no file"),
        (dict(paths=["notes.txt", " "]), ValueError, r"paths=\['notes.txt', ' '\] names no file"),
        (dict(num_workers=1.5), ValueError, r"num_workers=1.5 must be an integer >= 0, or null"),
        (dict(block_size=0), ValueError, "block_size=0 must be an integer >= 1"),
        (dict(batch_size=0), ValueError, "batch_size=0 must be an integer >= 1"),
        (dict(num_workers=-1), ValueError, "num_workers=-1 must be an integer >= 0"),
        (dict(block_size=True), ValueError, "block_size=True must be an integer >= 1"),
        (dict(val_fraction=1.0), ValueError, r"val_fraction=1.0 must be in \(0, 1\)"),
        (dict(val_fraction=0), ValueError, r"val_fraction=0 must be in \(0, 1\)"),
        (dict(train_dir="s3://b/t"), ValueError, "train_dir='s3://b/t' needs vocab_size"),
        (dict(paths=["x.txt"], train_dir="s3://b/t", vocab_size=8), ValueError, "give either paths"),
        (dict(val_dir="s3://b/v"), ValueError, "val_dir='s3://b/v' needs train_dir"),
        (dict(test_dir="s3://b/t"), ValueError, "test_dir='s3://b/t' needs train_dir"),
        (dict(test_fraction=1.0), ValueError, r"test_fraction=1.0 must be in \[0, 1\)"),
        (dict(test_fraction=-0.1), ValueError, r"test_fraction=-0.1 must be in \[0, 1\)"),
        (dict(val_fraction=0.5, test_fraction=0.5), ValueError,
         r"val_fraction=0.5 \+ test_fraction=0.5 must be < 1"),
        (dict(train_dir="s3://b/t", vocab_size=8, test_fraction=0.1), ValueError,
         "test_fraction=0.1 splits text given in paths; with train_dir='s3://b/t' give test_dir"),
        (dict(vocab_size=32000), ValueError, "vocab_size=32000 does not match the tokenizer's 257"),
    ],
)
def test_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        TextDataModule(**kwargs)


def test_empty_corpus_raises(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.csv").write_text("a,b\n")
    dm = TextDataModule(paths=[str(tmp_path)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"empty corpus: no non-empty text in paths=\[.*\] \(folders are searched"):
        dm.prepare_data()


def test_block_size_longer_than_the_data_raises(corpus, tmp_path):
    dm = TextDataModule(paths=[str(corpus / "a.txt")], block_size=4096, cache_dir=str(tmp_path))
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"block_size=4096 is longer than the data: .* the train split has \d+"):
        dm.setup("fit")
    dm = TextDataModule(paths=[str(corpus / "a.txt")], block_size=400, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"block_size=400 is longer than the data: .* the val split has \d+"):
        dm.setup("fit")
    # Train and val are long enough, the test split (1% of ~4K tokens) is not.
    dm = TextDataModule(paths=[str(corpus / "a.txt")], block_size=100, val_fraction=0.4, test_fraction=0.01,
                        cache_dir=str(tmp_path))
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"block_size=100 is longer than the data: .* the test split has \d+"):
        dm.setup("fit")


def test_setup_before_prepare_raises(corpus, tmp_path):
    dm = TextDataModule(paths=[str(corpus)], cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="call prepare_data"):
        dm.setup("fit")
    with pytest.raises(RuntimeError, match="call setup"):
        dm.train_dataloader()


# ---------------------------------------------------------------------- never corrupt silently
def test_binary_files_are_refused_unless_allowed(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text " * 20)
    (tmp_path / "utf16.txt").write_bytes("hello".encode("utf-16"))  # NUL bytes: looks binary, as git says
    dm = TextDataModule(paths=[str(tmp_path)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data file '.*utf16.txt' looks binary \(a NUL byte at offset \d+; UTF-16 "
                                         r".*set allow_binary=true"):
        dm.prepare_data()
    assert not list((tmp_path / "cache").glob("*"))  # refused before anything was written
    with pytest.warns(UserWarning, match=r"replaced 2 undecodable byte sequences"):
        docs = read_corpus([str(tmp_path)], (".txt",), allow_binary=True)
    assert [os.path.basename(name) for name, _ in docs] == ["notes.txt", "utf16.txt"]


def test_replaced_bytes_are_counted_in_one_warning(tmp_path):
    (tmp_path / "good.txt").write_text("fine text \ufffd stays (a real replacement character)", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café crème brûlée".encode("latin-1"))  # 4 invalid bytes, one per accent
    (tmp_path / "one.txt").write_bytes(b"bad \xff byte")
    with pytest.warns(UserWarning, match=r"replaced 5 undecodable byte sequences with U\+FFFD in 2 of 3 files "
                                         r"\(most in '.*latin1.txt': 4\)"):
        docs = dict(read_corpus([str(tmp_path)], (".txt",)))
    assert docs[str(tmp_path / "latin1.txt")] == "caf\ufffd cr\ufffdme br\ufffdl\ufffde"
    assert docs[str(tmp_path / "good.txt")].count("\ufffd") == 1


def test_crlf_text_reads_as_before(tmp_path):
    # Text mode's universal newlines: the same tokens (and cache folders) as Path.read_text gave.
    (tmp_path / "dos.txt").write_bytes(b"line one\r\nline two\rthree\n")
    assert read_corpus([str(tmp_path / "dos.txt")], (".txt",))[0][1] == "line one\nline two\nthree\n"


def test_failed_preparation_removes_its_temporary_folder(corpus, tmp_path, monkeypatch):
    def interrupted(**kwargs):
        os.makedirs(kwargs["output_dir"], exist_ok=True)  # half-written, as a real interruption leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(litdata, "optimize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TextDataModule(paths=[str(corpus / "a.txt")], cache_dir=str(tmp_path)).prepare_data()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def _interrupting_emit(piece):
    # In litdata's worker process: Ctrl-C reaches the preparing process, then this worker waits to be stopped.
    import signal
    import time

    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(120)
    yield piece


def test_ctrl_c_during_preparation_cleans_up_and_leaves_ctrl_c_alone(corpus, tmp_path, monkeypatch):
    """litdata's own SIGINT handler would end the process with os._exit(0) (status 0, the folder
    left behind) and stay installed for the rest of the run."""
    import signal

    import zoo.data

    monkeypatch.setattr(zoo.data, "_emit_tokens", _interrupting_emit)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        TextDataModule(paths=[str(corpus / "a.txt")], cache_dir=str(tmp_path)).prepare_data()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGINT) is before


def test_stale_temporary_folders_of_dead_processes_are_removed(corpus, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = socket.gethostname()
    name = "byte-0123456789abcdef"
    stale = [tmp_path / f"{name}.tmp{dead_pid}-{host}", tmp_path / f"{name}.tmp{dead_pid}"]
    alive = tmp_path / f"byte-0123456789abcdef.tmp{os.getppid()}-{host}"  # the test runner's parent lives on
    elsewhere = tmp_path / f"byte-0123456789abcdef.tmp{dead_pid}-another-host"  # shared disk: not ours to judge
    for folder in (*stale, alive, elsewhere):
        (folder / "train").mkdir(parents=True)
    assert sorted(remove_stale_tmp_dirs(tmp_path)) == sorted(stale)
    assert alive.is_dir() and elsewhere.is_dir()
    # prepare_corpus does the same on its way in.
    (stale[0] / "train").mkdir(parents=True)
    TextDataModule(paths=[str(corpus / "a.txt")], cache_dir=str(tmp_path)).prepare_data()
    assert not stale[0].exists()
