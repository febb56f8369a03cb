"""Data mixtures (gptjax/data/mixture.py): rows meet the weights exactly per block, phases leave
earlier steps untouched, each source is cached on its own, per-source evaluation; chunked and
parallel preparation (gptjax/data/encode.py); shards as shipped (gptjax/data/sources/shards.py);
one-line errors for bad mixtures."""

import gzip
import json
import random

import numpy as np
import pytest
import zstandard
from conftest import run_processes, tiny_config
from test_data import SEQ_LEN, VOCAB, write_corpus

from gptjax import config
from gptjax.config import ConfigError, DataConfig
from gptjax.data import DataError, encode, mixture, pipeline
from gptjax.data.sources import jsonl, parquet

GPT3 = [0.6, 0.22, 0.08, 0.08, 0.03]  # GPT-3's table 2.2 (sums to 1.01, as printed)


def mix(cache, *sources, phases=None, **overrides) -> DataConfig:
    """A DataConfig mixing (name, source, weight) triples."""
    entries = [{"name": n, "source": s, "weight": w} for n, s, w in sources]
    settings = {"mixture": entries, "vocab_size": VOCAB, "cache_dir": str(cache), **overrides}
    return DataConfig(**settings, phases=phases)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three small text_dir corpora (a, b, c) and a cache holding a and b mixed 0.7 / 0.3."""
    base = tmp_path_factory.mktemp("mixture")
    dirs = {
        name: write_corpus(base / name, files=n, seed=i)
        for i, (name, n) in enumerate([("a", 30), ("b", 8), ("c", 12)])
    }
    sources = {name: f"text_dir:{path}" for name, path in dirs.items()}
    cfg = mix(base / "cache", ("a", sources["a"], 0.7), ("b", sources["b"], 0.3))
    return base, sources, cfg, mixture.load_dataset(cfg, SEQ_LEN, max_vocab=VOCAB)


def test_block_counts_are_the_weights_exactly():
    assert mixture.block_counts(GPT3) == (60, 22, 8, 8, 3)  # a block of 101 rows
    assert mixture.block_counts([0.7, 0.3]) == (7, 3)
    assert mixture.block_counts([2, 2, 4]) == (1, 1, 2)
    assert mixture.block_counts([1 / 3, 2 / 3]) == (1, 2)  # as written: 0.333.../0.999...
    odd = mixture.block_counts([0.123456, 0.5])  # exact would need 19,483 rows: rounded
    assert sum(odd) == mixture.MAX_BLOCK and odd == (1980, 8020)


def test_rows_per_source_equal_the_weights_in_every_block_over_1000_steps():
    counts = mixture.block_counts(GPT3)
    B, steps = 16, 1000
    schedule = mixture.Schedule([mixture.Phase(0, counts)], B, seed=3)
    sources, rows = schedule.assign(np.arange(B * steps))
    full = len(sources) // 101
    per_block = np.stack(
        [np.bincount(sources[b * 101 : (b + 1) * 101], minlength=5) for b in range(full)]
    )
    assert (per_block == counts).all()  # exactly, in each of the 158 blocks
    # Each source's rows are numbered 0, 1, 2, ... in order: no row skipped or given twice.
    for i in range(5):
        np.testing.assert_array_equal(rows[sources == i], np.arange((sources == i).sum()))
    np.testing.assert_array_equal(schedule.rows_before(B * steps), np.bincount(sources))
    # The order inside blocks is shuffled (by the seed), not the same block repeated.
    assert len({tuple(sources[b * 101 : (b + 1) * 101]) for b in range(full)}) == full
    other = mixture.Schedule([mixture.Phase(0, counts)], B, seed=4).assign(np.arange(101))[0]
    assert not np.array_equal(other, sources[:101])


def test_a_batch_holds_the_windows_of_its_sources(corpora):
    _, _, _, data = corpora
    B = 20
    sources, windows = data.train_indices(5, 7, B, 0, B)
    batch = data.train_batch(5, 7, B, 0, B)
    for i, part in enumerate(data.parts):
        rows = part.data.train.read(windows[sources == i])
        np.testing.assert_array_equal(batch["inputs"][sources == i], rows[:, :-1])
    assert np.bincount(sources, minlength=2).tolist() == [14, 6]  # two blocks of 10: 7 + 3 each
    # The small source repeats: its epochs cover every window once, then start again reshuffled.
    b = data.parts[1].data
    n = len(b.train)
    seed = mixture.source_seed(5, "b")
    first, second = b.window_ids(seed, np.arange(n)), b.window_ids(seed, np.arange(n, 2 * n))
    assert sorted(first) == sorted(second) == list(range(n))
    assert not np.array_equal(first, second)
    table = {row["name"]: row for row in data.table(5, 1000, B)}
    assert table["b"]["rows"] == 6000 and table["b"]["epochs"] == 6000 / n
    assert table["a"]["weights"] == [0.7]


def test_a_phase_at_step_k_leaves_earlier_steps_unchanged_and_resumes_deterministically(corpora):
    base, sources, cfg, data = corpora
    B, k = 8, 30
    phase = [
        {
            "at": k,
            "mixture": [
                {"name": "b", "source": sources["b"], "weight": 0.9},
                {"name": "a", "source": sources["a"], "weight": 0.1},
            ],
        }
    ]
    later = [*phase, {"at": 60, "mixture": [{"name": "a", "source": sources["a"], "weight": 1}]}]
    both = [("a", sources["a"], 0.7), ("b", sources["b"], 0.3)]
    phased = mixture.load_dataset(mix(base / "cache", *both, phases=phase), SEQ_LEN)
    more = mixture.load_dataset(mix(base / "cache", *both, phases=later), SEQ_LEN)
    for step in range(k):
        np.testing.assert_array_equal(
            phased.train_batch(1, step, B, 0, B)["inputs"],
            data.train_batch(1, step, B, 0, B)["inputs"],
        )
    # From step k on the new weights hold exactly (0.9 / 0.1: blocks of 10 rows from row k·B).
    src = np.concatenate([phased.train_indices(1, s, B, 0, B)[0] for s in range(k, k + 10)])
    assert np.bincount(src).tolist() == [8, 72]
    # Adding a later phase (a resumed run given one more) changes nothing before it.
    for step in (0, k - 1, k, 59):
        np.testing.assert_array_equal(
            more.train_batch(1, step, B, 0, B)["inputs"],
            phased.train_batch(1, step, B, 0, B)["inputs"],
        )
    assert set(more.train_indices(1, 60, B, 0, B)[0]) == {0}
    # Source b's rows go on where they stopped at the phase change: none reused early.
    schedule = phased.schedule(1, B)
    s, rows = schedule.assign(np.arange(0, 40 * B))
    np.testing.assert_array_equal(rows[s == 1], np.arange((s == 1).sum()))


def test_adding_a_third_source_reuses_the_first_two(corpora, monkeypatch):
    base, sources, cfg, data = corpora
    calls = []
    real = encode.encode_chunk
    monkeypatch.setattr(encode, "encode_chunk", lambda *a: calls.append(a[2]) or real(*a))
    tokenizer = data.parts[0].data.directory / "tokenizer.model"
    given = mix(
        base / "cache",
        ("a", sources["a"], 0.6),
        ("b", sources["b"], 0.2),
        ("c", sources["c"], 0.2),
        tokenizer=str(tokenizer),
    )
    three = mixture.load_dataset(given, SEQ_LEN, max_vocab=VOCAB)
    assert [p.data.directory for p in three.parts[:2]] == [p.data.directory for p in data.parts]
    assert calls and all("/.chunks-" in c for c in calls)
    assert {c.split("/.chunks-")[1].split("/")[0] for c in calls} == {
        three.parts[2].data.directory.name
    }
    calls.clear()
    reweighted = given.model_copy(update={"mixture": given.mixture[::-1]})
    mixture.load_dataset(reweighted, SEQ_LEN, max_vocab=VOCAB)
    assert calls == []  # reordering / reweighting never retokenizes


def snapshot(cache):
    return sorted((str(p.relative_to(cache)), p.stat().st_mtime_ns) for p in cache.rglob("*"))


def test_bad_mixtures_are_one_line_and_touch_no_cache(corpora, tmp_path):
    base, sources, cfg, _ = corpora
    before = snapshot(base / "cache")
    zero = f"data.mixture=[{{source: stdlib, weight: 1}}, {{source: '{sources['b']}', weight: 0}}]"
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight=0.0 .*positive"):
        config.load(None, [zero])
    with pytest.raises(ConfigError, match=r"data.mixture is empty"):
        config.load(None, ["data.mixture=[]"])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            ("a", sources["a"], 1),
            ("x", "nosuch:thing", 1),
            "source 'x': data.source='nosuch:thing': unknown source",
        ),
        (("a", sources["a"], 1), ("e", f"text_dir:{empty}", 1), "no .txt, .md or .jsonl files"),
        (
            ("a", sources["a"], 1),
            ("t", "chitchat", 1),
            "mixes conversations (t) with plain text (a)",
        ),
        (("a", sources["a"], 1), ("a", sources["b"], 1), "two sources are named 'a'"),
    ]
    for first, second, message in cases:
        bad = mix(base / "cache", first, second, packing="segments")  # as conversations need
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            mixture.load_dataset(bad, SEQ_LEN)
    assert snapshot(base / "cache") == before


def test_parallel_preparation_is_byte_identical_and_a_killed_one_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_DOCUMENTS", 8)  # 60 documents: 7 train chunks
    corpus_dir = write_corpus(tmp_path / "corpus", files=40, seed=9)
    serial = DataConfig(
        source=f"text_dir:{corpus_dir}",
        vocab_size=VOCAB,
        workers=1,
        cache_dir=str(tmp_path / "serial"),
    )
    first = pipeline.prepare(serial, SEQ_LEN)
    model = first / "tokenizer.model"
    parallel = serial.model_copy(update={"workers": 2, "cache_dir": str(tmp_path / "parallel")})
    second = pipeline.prepare(parallel, SEQ_LEN, tokenizer_path=model)
    for name in ("train.array_record", "val.array_record"):
        assert (first / name).read_bytes() == (second / name).read_bytes()

    class Killed(Exception):
        pass

    real, calls = encode.encode_chunk, []

    def dies_at_the_third(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise Killed
        return real(*args)

    killed = serial.model_copy(update={"cache_dir": str(tmp_path / "killed")})
    monkeypatch.setattr(encode, "encode_chunk", dies_at_the_third)
    with pytest.raises(Killed):
        pipeline.prepare(killed, SEQ_LEN, tokenizer_path=model)
    calls.clear()
    monkeypatch.setattr(encode, "encode_chunk", lambda *a: calls.append(a[1]) or real(*a))
    resumed = pipeline.prepare(killed, SEQ_LEN, tokenizer_path=model)
    assert calls[0] == (16, 24)  # chunks 0 and 1 were done; the third is tokenised again
    assert (resumed / "train.array_record").read_bytes() == (
        first / "train.array_record"
    ).read_bytes()
    assert not list((tmp_path / "killed" / "packed").glob(".chunks-*"))  # removed once complete


def shard_texts(seed, n):
    rng = random.Random(seed)
    return [
        " ".join(rng.choices(["héllo", "wörld", "the", "data\n", "✓"], k=rng.randint(1, 30)))
        for _ in range(n)
    ]


def test_parquet_and_compressed_jsonl_shards_read_back_exactly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [shard_texts(s, 50) for s in range(3)]
    (tmp_path / "pq" / "sub").mkdir(parents=True)
    for i, chunk in enumerate(texts):
        table = pa.table({"id": list(range(len(chunk))), "content": chunk})
        pq.write_table(
            table,
            tmp_path / "pq" / ("sub" if i == 2 else "") / f"part-{i}.parquet",
            row_group_size=16,
        )
    got = list(parquet.documents(f"{tmp_path}/pq/**/*.parquet:content")())
    assert [t for _, t in got] == texts[0] + texts[1] + texts[2]
    assert got[0][0] == "part-0.parquet:0" and got[-1][0] == "sub/part-2.parquet:49"

    (tmp_path / "js").mkdir()
    lines = [json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts[0])]
    with gzip.open(tmp_path / "js" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines[:25])
    with zstandard.open(tmp_path / "js" / "b.jsonl.zst", "wt", encoding="utf-8") as f:
        f.writelines(lines[25:])
    got = list(jsonl.documents(f"{tmp_path}/js/*")())
    assert [t for _, t in got] == texts[0]
    assert got[25][0] == "b.jsonl.zst:1"


def test_bad_shards_are_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "good.parquet").write_bytes(b"")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "good.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        parquet.documents(f"{tmp_path}/*.parquet")
    with pytest.raises(DataError, match=r"good.parquet: no column 'text' \(columns: body\)"):
        parquet.documents(f"{tmp_path}/good.parquet")
    with pytest.raises(DataError, match=r"parquet:.*/none-\*.parquet: no files match"):
        parquet.documents(f"{tmp_path}/none-*.parquet")
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"x.jsonl.gz:2: no string field 'text'"):
        list(jsonl.documents(f"{tmp_path}/x.jsonl.gz")())
    # A .zst cut short (zstandard's own reader would stop there without a word) and garbage.
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.compress(b'{"text": "a"}\n' * 100)[:-9])
    with pytest.raises(DataError, match=r"cut.jsonl.zst: unreadable after line 0 .*truncated"):
        list(jsonl.documents(f"{tmp_path}/cut.jsonl.zst")())
    (tmp_path / "junk.jsonl.zst").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match=r"junk.jsonl.zst: unreadable after line 0"):
        list(jsonl.documents(f"{tmp_path}/junk.jsonl.zst")())


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_mixture_run_resumed_by_2_processes_and_scored_per_source(corpora, tmp_path, cache_dir):
    """One run on 8 devices; its copy resumed from step 3 by 2 processes (1 device each) gives
    the same losses (so the same batches); eval figures per source and mixed."""
    import shutil

    from gptjax.training import loop, runs

    _, sources, _, _ = corpora
    entries = ", ".join(
        f"{{name: {n}, source: '{sources[n]}', weight: {w}}}" for n, w in (("a", 0.7), ("b", 0.3))
    )
    common = [f"data.mixture=[{entries}]", "data.vocab_size=320", "model.seq_len=32"]
    common += ["train.steps=6", "train.log_every=1", "train.eval_every=0", "checkpoint.every=3"]
    first = tmp_path / "first"
    loop.train(tiny_config(first, cache_dir, *common), progress=False)
    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoints" / "6")
    (second / "metrics.jsonl").write_text("")
    args = ["train", "configs/debug.yaml", f"run_dir={second}", f"data.cache_dir={cache_dir}"]
    results = run_processes([[*args, *common, "--no-progress"]] * 2, timeout=240)
    for code, err in results:
        assert code == 0, err[-3000:]
    expected = {m["step"]: m["loss"] for m in metrics(first) if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in metrics(second) if "loss" in m}
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == pytest.approx({s: expected[s] for s in resumed}, rel=1e-5)

    evals = [m for m in metrics(first) if "eval_loss" in m]
    for record in evals:
        assert record["eval_loss"] == pytest.approx(
            0.7 * record["eval_loss/a"] + 0.3 * record["eval_loss/b"], rel=1e-6
        )
        assert {"eval_bpb/a", "eval_bpb/b", "eval_ppl/a"} <= set(record)
    assert (first / "tensorboard").is_dir()
    scored = runs.score_held_out(first)  # what `gptjax eval` prints
    # Oracle for a source's figure: the same checkpoint scored with that source alone.
    alone = tmp_path / "alone"
    shutil.copytree(first, alone)
    saved = config.load(alone / "config.yaml")
    saved.data = saved.data.model_copy(update={"source": sources["b"], "mixture": None})
    (alone / "config.yaml").write_text(saved.to_yaml())
    single = runs.score_held_out(alone)
    assert scored["eval_loss/b"] == pytest.approx(single["eval_loss"], rel=1e-6)
    assert scored["eval_bpb/b"] == pytest.approx(single["eval_bpb"], rel=1e-6)
