"""Several processes, one data cache (gptjax/data/sharing.py): processes sharing a cache directory
prepare it once (the others wait), processes with their own directories each prepare theirs, and
a failure stops every process with the same line. Real processes (2 x 1 CPU device, gloo), each
run bounded by a timeout that fails the test.

The oracle for "who prepared": a one-file corpus says how it was cut ("... is one file ...") when,
and only when, a process writes its documents."""

import random

import pytest
from conftest import ROOT, run_processes

CONFIG = str(ROOT / "configs" / "debug.yaml")
WORDS = "the of and to in is was for on that with as by at from def return import class".split()
SAID = "is one file"


def write_book(path, lines: int) -> str:
    rng = random.Random(5)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(lines)) + "\n")
    return str(path)


def two_processes(tmp_path, caches, *overrides, timeout=240) -> list[tuple[int, str]]:
    """`gptjax train` as processes 0 and 1 of one job, process i with data.cache_dir=caches[i];
    returns [(exit code, stderr)] per process."""
    args = ["train", CONFIG, f"run_dir={tmp_path / 'run'}", "train.steps=2", "train.eval_every=0"]
    args += ["checkpoint.every=0", "data.vocab_size=320", "distributed.heartbeat_timeout=20"]
    args += [*overrides, "--no-progress"]
    return run_processes([[*args, f"data.cache_dir={cache}"] for cache in caches], timeout)


def packed(cache) -> list[str]:
    return sorted(p.name for p in (cache / "packed").iterdir() if not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_sharing_a_cache_prepare_it_once(tmp_path):
    book = write_book(tmp_path / "book.txt", 3000)
    cache = tmp_path / "cache"
    results = two_processes(tmp_path, [cache, cache], f"data.source=text:{book}")
    for code, err in results:
        assert code == 0, err[-3000:]
    (_, first), (_, second) = results
    assert first.count(SAID) == 1 and second.count(SAID) == 0  # process 0 alone wrote them
    assert f"process 0 prepares the data cache {cache}; 1 wait for it" in first
    assert len(packed(cache)) == 1
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".gptjax-share")]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_their_own_caches_each_prepare_theirs(tmp_path):
    book = write_book(tmp_path / "book.txt", 3000)
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    results = two_processes(tmp_path, caches, f"data.source=text:{book}")
    for code, err in results:
        assert code == 0, err[-3000:]
        assert err.count(SAID) == 1  # each process wrote its own
        assert "prepares the data cache" not in err
    # The same data, tokenizer and windows on both (the packed key covers all three).
    assert packed(caches[0]) == packed(caches[1]) and len(packed(caches[0])) == 1
    names = [packed(cache)[0] for cache in caches]
    windows = [
        (c / "packed" / n / "train.array_record").read_bytes()
        for c, n in zip(caches, names, strict=True)
    ]
    assert windows[0] == windows[1]


@pytest.mark.multiprocess
def test_a_preparation_that_fails_stops_both_processes_with_its_line(tmp_path):
    book = write_book(tmp_path / "book.txt", 40)  # too few tokens for a window of 65
    cache = tmp_path / "cache"
    results = two_processes(tmp_path, [cache, cache], f"data.source=text:{book}")
    lines = [err.strip().splitlines()[-1] for _, err in results]
    assert [code for code, _ in results] == [2, 2], lines
    assert lines[0] == lines[1]
    assert "split holds" in lines[0] and "fewer than model.seq_len+1=65" in lines[0]
