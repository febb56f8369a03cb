"""The data pipeline: documents (TFDS ArrayRecord), tokenizer, packed windows, step-indexed
batches per process, prefetch, the cache, and the one-line errors for bad input."""

import json
import random
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_config
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from gptjax.config import DataConfig
from gptjax.data import DataError, corpus, encode, loader, pipeline
from gptjax.data import tokenizer as tok

SEQ_LEN = 16
VOCAB = 320
WORDS = (
    "the of and to in is was for on that with as by at from his her an which were are this be "
    "had not or have one their all but they been has who its new more also two after first "
    "def return import class self None True False while yield lambda print(x) value = 42 3.14"
).split()


def write_corpus(root, files=40, seed=0):
    """A small deterministic text_dir corpus: .txt and .md files plus one .jsonl."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 14))) for _ in range(30)]
        suffix = ".md" if i % 5 == 0 else ".txt"
        (root / f"doc{i:03d}{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = [{"text": " ".join(rng.choices(WORDS, k=40)), "id": n} for n in range(20)]
    (root / "extra.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def data_config(source, cache, **overrides):
    settings = {"source": source, "vocab_size": VOCAB, "cache_dir": str(cache), **overrides}
    return DataConfig(**settings)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(DataConfig, Dataset) of the small corpus, prepared once for this module."""
    base = tmp_path_factory.mktemp("small")
    cfg = data_config(f"text_dir:{write_corpus(base / 'corpus')}", base / "cache")
    return cfg, pipeline.load_dataset(cfg, SEQ_LEN, max_vocab=VOCAB)


def mesh_of(data, tensor):
    devices = np.array(jax.devices()[: data * tensor]).reshape(data, tensor)
    return jax.sharding.Mesh(devices, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def test_prepared_windows_hold_the_documents(small):
    cfg, data = small
    meta = data.meta
    assert meta["train"]["windows"] == len(data.train) > 100
    assert meta["validation"]["windows"] == len(data.val) > 0
    assert meta["train"]["documents"] + meta["validation"]["documents"] == 40 + 20
    window = data.train.read(np.arange(len(data.train)))
    assert window.shape == (len(data.train), SEQ_LEN + 1) and window.dtype == np.int32
    # Packing: the windows are the token stream (documents + end-of-document) in order.
    stream = window.reshape(-1)
    eod = data.tokenizer.eod_id
    first_doc = data.tokenizer.decode(stream[: int(np.argmax(stream == eod))])
    assert first_doc.split("\n")[0].split()[0] in WORDS
    # Every document ends with the end-of-document token (the last one may be in the cut tail).
    assert (stream == eod).sum() in (meta["train"]["documents"] - 1, meta["train"]["documents"])


@pytest.mark.parametrize("data_axis,tensor_axis", [(8, 1), (4, 2), (2, 4)])
def test_batch_is_the_same_for_1_2_4_processes(small, data_axis, tensor_axis):
    _, data = small
    B = 16
    sharding = NamedSharding(mesh_of(data_axis, tensor_axis), PartitionSpec("data", None))
    shape = (B, SEQ_LEN + 1)
    devices = list(sharding.mesh.devices.flat)
    for step in (0, 3, 250):
        whole = data.train_rows(7, step, B, 0, B)
        for processes in (1, 2, 4):
            per = len(devices) // processes
            parts, owned = [], []
            for p in range(processes):  # the devices of process p, as jax.distributed lays them
                ranges = loader.row_ranges(sharding, shape, devices[p * per : (p + 1) * per])
                rows_fn = lambda a, b, s=step: data.train_rows(7, s, B, a, b)  # noqa: E731
                parts.append(loader.local_rows(rows_fn, ranges))
                owned.append({r for a, b in ranges for r in range(a, b)})
            # Processes never read the same row, unless they hold replicas of one data shard
            # (more processes than data shards): then they read the same rows.
            for p in range(processes):
                for q in range(p + 1, processes):
                    if processes <= data_axis:
                        assert not owned[p] & owned[q]
                    else:
                        assert not owned[p] & owned[q] or owned[p] == owned[q]
            assert set().union(*owned) == set(range(B))
            unique = {min(rows): part for rows, part in zip(owned, parts, strict=True)}
            in_order = [unique[first] for first in sorted(unique)]
            np.testing.assert_array_equal(np.concatenate(in_order), whole)
        rows_fn = lambda a, b, s=step: data.train_rows(7, s, B, a, b)  # noqa: E731
        built = loader.assemble(sharding, shape, rows_fn)
        np.testing.assert_array_equal(np.asarray(built), whole)


def test_replicas_read_their_rows_once():
    sharding = NamedSharding(mesh_of(2, 4), PartitionSpec("data", None))
    devices = list(sharding.mesh.devices.flat)
    assert loader.row_ranges(sharding, (8, 5), devices[:4]) == [(0, 4)]
    assert loader.row_ranges(sharding, (8, 5), devices) == [(0, 8)]
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    assert loader.row_ranges(replicated, (8, 5), devices[4:]) == [(0, 8)]


def test_epoch_holds_every_window_once_and_epochs_differ(small):
    _, data = small
    n, B = len(data.train), 32
    steps = -(-2 * n // B)
    order = np.concatenate([data.train_indices(3, s, B, 0, B) for s in range(steps)])
    first, second = order[:n], order[n : 2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(n))
    other_seed = np.concatenate([data.train_indices(4, s, B, 0, B) for s in range(steps)])
    assert not np.array_equal(order, other_seed)
    np.testing.assert_array_equal(data.train_rows(3, 5, B, 0, B), data.train.read(order[160:192]))


def test_split_is_by_name_and_tiny_corpora_hold_out_the_last_document():
    docs = [(f"file{i}.txt", f"text {i}") for i in range(200)] + [("empty.txt", "")]
    train = list(corpus.split_documents(iter(docs), 0.1, want_validation=False))
    val = list(corpus.split_documents(iter(docs), 0.1, want_validation=True))
    assert sorted(train + val) == sorted(docs[:200]) and 5 < len(val) < 40
    assert val == [d for d in docs[:200] if corpus.is_validation(d[0], 0.1)]
    assert list(corpus.split_documents(iter(reversed(docs)), 0.1, True)) == val[::-1]
    few = [("a", "x"), ("b", "y"), ("c", "z")]
    few = [d for d in few if not corpus.is_validation(d[0], 0.01)]
    assert list(corpus.split_documents(iter(few), 0.01, True)) == few[-1:]
    assert list(corpus.split_documents(iter(few), 0.01, False)) == few[:-1]


def test_one_file_is_cut_into_pieces_that_end_at_line_ends(tmp_path):
    rng = random.Random(2)
    lines = [" ".join(rng.choices(WORDS + ["café", "naïve", "日本語"], k=9)) for _ in range(900)]
    text = "\n".join(lines) + "\nno newline at the end"
    book = tmp_path / "book.txt"
    book.write_text(text, encoding="utf-8")
    pieces = list(corpus.iter_text_file(book))
    assert "".join(piece for _, piece in pieces) == text  # nothing lost, nothing added
    assert [name for name, _ in pieces] == [f"book.txt#{k}" for k in range(len(pieces))]
    assert all(piece.endswith("\n") for _, piece in pieces[:-1])
    size = len(text.encode())
    assert corpus.piece_bytes(size) == size // corpus.PIECES
    assert corpus.PIECES - 2 <= len(pieces) <= corpus.PIECES + 1
    # One line of multi-byte characters longer than a piece: cut at the byte limit, never
    # inside a character.
    line = tmp_path / "line.txt"
    line.write_text("é" * 5000 + "日本" * 700, encoding="utf-8")
    cut = [piece for _, piece in corpus.iter_text_file(line)]
    assert "".join(cut) == line.read_text(encoding="utf-8")
    assert len(cut) == corpus.PIECES // 2 + 1  # twice the piece size each (no line end)
    # A bad byte is reported with its offset in the file, as for text_dir files.
    bad = tmp_path / "bad.txt"
    bad.write_bytes(text.encode()[:5000] + b"\xff" + b"tail\n")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 \(byte 5000\)"):
        list(corpus.iter_text_file(bad))
    with pytest.raises(DataError, match=f"data file not found: {tmp_path / 'nope.txt'}$"):
        pipeline.prepare(data_config(f"text:{tmp_path / 'nope.txt'}", tmp_path), SEQ_LEN)
    with pytest.raises(DataError, match=f"not a file: {tmp_path} .*text_dir:{tmp_path}\\)$"):
        pipeline.prepare(data_config(f"text:{tmp_path}", tmp_path), SEQ_LEN)


@pytest.mark.parametrize("kind", ["text_dir", "text"])
def test_a_one_file_corpus_prepares_and_says_how_it_was_split(tmp_path, kind, caplog):
    """text_dir:DIR with one file (it used to stop: "fewer than 2 non-empty documents") and
    text:FILE both hold out whole pieces of the file."""
    rng = random.Random(3)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 14))) for _ in range(2000)]
    (tmp_path / "corpus").mkdir()
    book = tmp_path / "corpus" / "input.txt"
    book.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = f"text_dir:{book.parent}" if kind == "text_dir" else f"text:{book}"
    with caplog.at_level("INFO", logger="gptjax"):
        data = pipeline.load_dataset(data_config(source, tmp_path / "cache"), SEQ_LEN)
    name = "input.txt"
    pieces = list(corpus.iter_text_file(book))
    held = [p for p in pieces if corpus.is_validation(p[0], 0.05)] or pieces[-1:]
    said = [r.getMessage() for r in caplog.records if "one file" in r.getMessage()]
    size = book.stat().st_size
    assert said == [
        f"{book} is one file ({size:,} bytes): cut into {len(pieces)} pieces of {size // 64:,}+ "
        f"bytes ending at line ends; {len(held)} whole pieces held out for validation (by a "
        "hash of their names, data.val_fraction)"
    ]
    meta = data.meta
    assert meta["validation"]["documents"] == len(held) >= 1
    assert meta["train"]["documents"] == len(pieces) - len(held)
    assert meta["train"]["bytes"] + meta["validation"]["bytes"] == size
    assert all(n.startswith(f"{name}#") for n, _ in pieces)
    assert len(data.train) > 0 and len(data.val) > 0


def test_a_one_file_corpus_trains_and_evaluates(tmp_path, capsys):
    """`text:FILE` end to end: train, then `gptjax eval` of the run gives the loss the run's own
    final evaluation logged (the same 2 held-out batches)."""
    from gptjax import cli
    from gptjax.training import loop

    rng = random.Random(4)
    book = tmp_path / "input.txt"
    book.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(3000)) + "\n")
    run = tmp_path / "run"
    cfg = tiny_config(
        run,
        tmp_path / "cache",
        f"data.source=text:{book}",
        f"data.vocab_size={VOCAB}",
        "train.steps=4",
        "train.eval_every=0",
        "checkpoint.every=0",
    )
    result = loop.train(cfg, progress=False)
    assert result["final_step"] == 4 and np.isfinite(result["eval_loss"])
    assert cli.main(["eval", str(run), "--batches", str(cfg.train.eval_steps)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)


def test_resume_gives_the_same_batches(small):
    cfg, data = small
    B, seed = 8, 11
    build = lambda d: lambda s: d.train_rows(seed, s, B, 0, B)  # noqa: E731
    with loader.Prefetcher(build(data), depth=3, stop=20) as prefetch:
        uninterrupted = [prefetch.get(s) for s in range(20)]
    reopened = pipeline.load_dataset(cfg, SEQ_LEN)  # a new process: only the step is known
    with loader.Prefetcher(build(reopened), depth=2, stop=20) as prefetch:
        resumed = [prefetch.get(s) for s in range(12, 20)]
    for a, b in zip(uninterrupted[12:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefetcher_builds_ahead_in_a_background_thread():
    built, threads = [], set()
    release = threading.Event()

    def build(step):
        threads.add(threading.get_ident())
        built.append(step)
        release.wait(5)
        return step * 10

    with loader.Prefetcher(build, depth=2, stop=5) as prefetch:
        release.set()
        assert prefetch.get(0) == 0
        assert prefetch.get(1) == 10
        assert prefetch.get(3) == 30  # a jump (step 2 is dropped)
        assert prefetch.get(4) == 40
    assert threading.get_ident() not in threads
    assert set(built) <= {0, 1, 2, 3, 4} and built[:3] == [0, 1, 2]


def test_validation_batches_are_fixed_on_every_mesh(small):
    _, data = small
    B, shape = 8, (8, SEQ_LEN + 1)
    expected = data.val.read(np.arange(B, 2 * B) % len(data.val))
    for axes in ((8, 1), (2, 4), (1, 8)):
        sharding = NamedSharding(mesh_of(*axes), PartitionSpec("data", None))
        built = loader.assemble(sharding, shape, lambda a, b: data.val_rows(1, B, a, b))
        np.testing.assert_array_equal(np.asarray(built), expected)


def test_second_prepare_reuses_the_cache_and_changes_rebuild(small, tmp_path, monkeypatch):
    cfg, data = small
    assert pipeline.prepare(cfg, SEQ_LEN) == data.directory

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached dataset")

    with monkeypatch.context() as patch:
        patch.setattr(encode, "pack_split", no_rebuild)
        patch.setattr(tok, "train", no_rebuild)
        assert pipeline.prepare(cfg, SEQ_LEN) == data.directory
    # Another seq_len, another tokenizer (a given one, or another vocab size): new directories.
    assert pipeline.prepare(cfg, SEQ_LEN + 8) != data.directory
    other_tok = data_config(cfg.source, cfg.cache_dir, vocab_size=VOCAB + 16)
    assert pipeline.prepare(other_tok, SEQ_LEN) != data.directory
    model = tmp_path / "given.model"
    texts = [path.read_text() for path in data.directory.parents[2].glob("corpus/*.txt")]
    model.write_bytes(tok.train(texts, VOCAB - 10))
    given = pipeline.prepare(cfg, SEQ_LEN, tokenizer_path=model)
    assert given != data.directory
    assert (given / "tokenizer.model").read_bytes() == model.read_bytes()
    # Changing the corpus rebuilds from the documents up.
    corpus_dir = write_corpus(tmp_path / "corpus", files=12)
    changing = data_config(f"text_dir:{corpus_dir}", cfg.cache_dir)
    before = pipeline.prepare(changing, SEQ_LEN)
    with (corpus_dir / "doc003.txt").open("a") as f:
        f.write("a new line of text\n")
    after = pipeline.prepare(changing, SEQ_LEN)
    assert after != before
    assert json.loads((after / "meta.json").read_text())["train"]["bytes"] in (
        json.loads((before / "meta.json").read_text())["train"]["bytes"] + 19,
        json.loads((before / "meta.json").read_text())["train"]["bytes"],  # doc003 in validation
    )


def leftovers(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name.startswith(".tmp"))


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: (d / "bad.txt").write_bytes(b"caf\xe9 au lait"), "bad.txt: not UTF-8 (byte 3)"),
        (lambda d: None, "no .txt, .md or .jsonl files"),
        (
            lambda d: (d / "rows.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n'),
            "rows.jsonl:2: no string field 'text'",
        ),
        (lambda d: (d / "rows.jsonl").write_text("{not json\n"), "rows.jsonl:1: not valid JSON"),
    ],
    ids=["non-utf8", "empty-dir", "jsonl-without-text", "jsonl-not-json"],
)
def test_bad_text_dir_is_one_clear_error_and_leaves_no_partial_cache(tmp_path, setup, message):
    corpus_dir = tmp_path / "corpus"
    if message != "no .txt, .md or .jsonl files":
        write_corpus(corpus_dir, files=3)
    corpus_dir.mkdir(exist_ok=True)
    setup(corpus_dir)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        pipeline.prepare(data_config(f"text_dir:{corpus_dir}", cache), SEQ_LEN)
    assert "\n" not in str(error.value)
    assert leftovers(cache) == []
    assert not (cache / "documents").exists() or not any((cache / "documents").iterdir())
    assert not (cache / "packed").exists()


def test_missing_path_and_tokenizer_errors(small, tmp_path):
    cfg, data = small
    with pytest.raises(DataError, match=f"data directory not found: {tmp_path / 'nope'}"):
        pipeline.prepare(data_config(f"text_dir:{tmp_path / 'nope'}", tmp_path), SEQ_LEN)
    with pytest.raises(DataError, match="tokenizer not found: .*missing.model"):
        pipeline.prepare(cfg, SEQ_LEN, tokenizer_path=tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
        pipeline.prepare(cfg, SEQ_LEN, tokenizer_path=junk)
    saved = data.directory / "tokenizer.model"
    with pytest.raises(DataError, match=f"{saved} has {VOCAB} pieces but model.vocab_size=300"):
        pipeline.prepare(cfg, SEQ_LEN, tokenizer_path=saved, max_vocab=300)
    with pytest.raises(DataError, match=f"data.vocab_size={VOCAB} does not fit model.vocab_size"):
        pipeline.prepare(cfg, SEQ_LEN, max_vocab=300)
    with pytest.raises(DataError, match="fewer than model.seq_len\\+1=100001"):
        pipeline.prepare(cfg, 100_000)
    too_many = data_config(cfg.source, cfg.cache_dir, vocab_size=5000)
    with pytest.raises(DataError, match="5000-piece tokenizer failed: Vocabulary size too high"):
        pipeline.prepare(too_many, SEQ_LEN)
    assert leftovers(tmp_path) == [] and leftovers(data.directory.parents[1]) == []


def test_cli_data_prepare_reports_bad_input_in_one_line(small, tmp_path):
    cfg, data = small
    (tmp_path / "bad.md").write_bytes(b"ok\n\xff\xfe\n")
    result = run_cli(
        "data",
        "prepare",
        "configs/debug.yaml",
        f"data.source=text_dir:{tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--no-progress",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"gptjax: error: {tmp_path / 'bad.md'}: not UTF-8 (byte 3)" + (
        "; convert or remove it"
    )
    ok = run_cli(
        "data",
        "prepare",
        "configs/debug.yaml",
        f"data.source={cfg.source}",
        f"data.cache_dir={cfg.cache_dir}",
        f"data.vocab_size={VOCAB}",
        f"model.seq_len={SEQ_LEN}",
        f"run_dir={tmp_path / 'run'}",
        "--no-progress",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["directory"] == str(data.directory)


def tfds_dataset(data_dir, dataset_name, features, splits):
    """Write a tiny TFDS dataset (ArrayRecord) with `features` {name: 'text' | 'int'} and
    `splits` {split: [record dict, ...]}, without TensorFlow."""
    import tensorflow_datasets as tfds

    kinds = {"text": tfds.features.Text(), "int": tfds.features.Scalar(np.int64)}

    class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            feats = tfds.features.FeaturesDict({k: kinds[v] for k, v in features.items()})
            return tfds.core.DatasetInfo(builder=self, features=feats)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in splits.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    builder = TinyText(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def test_tfds_source_reads_the_text_field_and_held_out_split(tmp_path):
    rng = random.Random(1)
    docs = [" ".join(rng.choices(WORDS, k=60)) for _ in range(90)]
    data_dir, cache = tmp_path / "tfds", tmp_path / "cache"
    rows = lambda texts: [{"text": t, "label": i} for i, t in enumerate(texts)]  # noqa: E731
    tfds_dataset(data_dir, "tiny_text", {"text": "text", "label": "int"},
                 {"train": rows(docs[:80]), "test": rows(docs[80:])})  # fmt: skip
    cfg = data_config("tfds:tiny_text", cache, tfds_data_dir=str(data_dir))
    data = pipeline.load_dataset(cfg, SEQ_LEN)
    assert data.meta["train"]["documents"] == 80 and data.meta["validation"]["documents"] == 10
    assert "field 'text'" in data.meta["description"]
    assert data.meta["train"]["bytes"] == sum(len(d.encode()) for d in docs[:80])
    # One string feature under another name is used; with no held-out split, a hash hold-out.
    tfds_dataset(data_dir, "one_field", {"body": "text"}, {"train": [{"body": d} for d in docs]})
    cfg = data_config("tfds:one_field", cache, tfds_data_dir=str(data_dir), val_fraction=0.2)
    meta = pipeline.load_dataset(cfg, SEQ_LEN).meta
    assert "field 'body'" in meta["description"]
    assert meta["train"]["documents"] + meta["validation"]["documents"] == 90
    assert 5 <= meta["validation"]["documents"] <= 35
    two = {"train": [{"a": "x", "b": "y"}]}
    tfds_dataset(data_dir, "two_fields", {"a": "text", "b": "text"}, two)
    with pytest.raises(DataError, match="tfds:two_fields: no string feature 'text'.*: a, b"):
        pipeline.prepare(data_config("tfds:two_fields", cache, tfds_data_dir=str(data_dir)), 8)
    with pytest.raises(DataError, match="tfds:lm1b is not prepared in .*tfds build lm1b"):
        pipeline.prepare(data_config("tfds:lm1b", cache, tfds_data_dir=str(data_dir)), 8)


@pytest.mark.slow
def test_tokenizer_round_trips_every_stdlib_file(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path / "run", cache_dir)
    directory = pipeline.prepare(cfg.data, cfg.model.seq_len, max_vocab=cfg.model.vocab_size)
    tokenizer = tok.Tokenizer.load(directory / "tokenizer.model")
    texts, names = [], []
    for path in corpus.stdlib_files(include_tests=True):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue  # a few test files are deliberately not UTF-8
        names.append(path)
    assert len(texts) > 1000
    decoded = [tokenizer.decode(ids) for ids in tokenizer.encode_batch(texts)]
    broken = [str(n) for n, a, b in zip(names, texts, decoded, strict=True) if a != b]
    assert broken == []


def test_importing_the_training_path_loads_neither_tfds_nor_grain():
    heavy = (
        "('tensorflow_datasets', 'grain', 'tensorflow', 'torch', 'transformers', 'tokenizers', "
        "'fastapi', 'uvicorn', 'chitchat_dataset')"
    )
    code = (
        "import sys, gptjax, gptjax.training.loop, gptjax.data, gptjax.cli, gptjax.interop, "
        "gptjax.inference.chatbot, gptjax.inference.terminal; "
        f"print(sorted(m for m in {heavy} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_documents_reach_the_writer_a_batch_at_a_time(monkeypatch):
    """write_splits hands the TFDS writer at most WRITE_DOCUMENTS documents (or about
    WRITE_BYTES) per call while the source is still being read, holding back only the train
    document split_documents keeps: memory holds one batch whatever the corpus size
    (download_and_prepare held every document until the end)."""
    from gptjax.data import array_records

    monkeypatch.setattr(array_records, "WRITE_DOCUMENTS", 4)
    monkeypatch.setattr(array_records, "WRITE_BYTES", 25)
    docs = [(f"doc{i:02d}", "x" * (1 + i % 9)) for i in range(60)]
    train = {name for name, _ in corpus.split_documents(iter(docs), 0.2, False)}
    pulled = 0

    def source():
        nonlocal pulled
        pulled = 0
        for document in docs:
            pulled += 1
            yield document

    written = {"train": [], "validation": []}

    class Writer:
        def add_examples(self, split_examples):
            ((split, batch),) = split_examples.items()
            assert 1 <= len(batch) <= 4
            assert sum(len(e["text"]) for e in batch[:-1]) < 25  # full once it holds 25
            written[split] += [(e["name"], e["text"]) for e in batch]
            if split == "train":  # read no further than the next train document
                last = int(batch[-1]["name"][3:])
                later = [j for j in range(last + 1, len(docs)) if docs[j][0] in train]
                assert pulled <= (later[0] + 1 if later else len(docs))

    sizes = []
    array_records.write_splits(Writer(), source, 0.2, sizes.append)
    assert written["train"] == list(corpus.split_documents(iter(docs), 0.2, False))
    assert written["validation"] == list(corpus.split_documents(iter(docs), 0.2, True))
    assert sizes == [len(text) for _, text in written["train"]]
    assert len(written["train"]) > 8 and written["validation"]


def test_a_chunk_is_tokenised_a_batch_at_a_time(small, tmp_path, monkeypatch):
    """encode_chunk gives the tokenizer at most ENCODE_DOCUMENTS documents / ENCODE_BYTES
    characters per call (a longer document alone), and the chunk file holds exactly the
    one-by-one token ids."""
    tokenizer = small[1].tokenizer
    monkeypatch.setattr(encode, "ENCODE_DOCUMENTS", 3)
    monkeypatch.setattr(encode, "ENCODE_BYTES", 100)
    texts = [" ".join(WORDS[i : i + 2 + 5 * (i % 4)]) for i in range(20)] + ["x y " * 80, "z"]
    encode._setup(tokenizer.filename, tokenizer.model_bytes, False, None)
    worker, calls = encode._worker["tokenizer"], []
    real = worker.encode_batch
    monkeypatch.setattr(worker, "encode_batch", lambda batch: calls.append(batch) or real(batch))
    encode.encode_chunk(texts, (0, len(texts)), str(tmp_path / "chunk.npz"))
    assert [text for batch in calls for text in batch] == texts
    for batch in calls:
        assert len(batch) <= 3 and (len(batch) == 1 or sum(map(len, batch)) <= 100)
    expected = [tokenizer.encode(text) for text in texts]
    with np.load(tmp_path / "chunk.npz") as stored:
        assert stored["lengths"].tolist() == [len(ids) for ids in expected]
        assert stored["tokens"].tolist() == [i for ids in expected for i in ids]


def test_sentencepiece_batches_keep_one_thread_pool(small):
    """encode_batch on threads > 1 reuses one SentencePiece ThreadPool (new threads on every
    call took new malloc arenas) and gives the one-by-one ids, at 1 thread too and after a
    pickle."""
    import pickle

    tokenizer = tok.Tokenizer(small[1].tokenizer.model_bytes)
    texts = [" ".join(WORDS[i : i + 9]) for i in range(0, 60, 3)]
    expected = [tokenizer.encode(text) for text in texts]
    tokenizer.threads = 2
    assert tokenizer.encode_batch(texts) == expected
    pool = tokenizer._pool()
    assert tokenizer.encode_batch(texts) == expected and tokenizer._pool() is pool
    tokenizer.threads = 1
    assert tokenizer.encode_batch(texts) == expected
    copy = pickle.loads(pickle.dumps(tokenizer))
    copy.threads = 2
    assert copy.encode_batch(texts) == expected
