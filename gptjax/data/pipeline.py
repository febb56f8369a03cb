"""Prepared token data and step-indexed batches.

`prepare` tokenises a corpus once and caches the token streams (written under a temporary name,
renamed when complete). `Dataset` packs them into windows of seq_len + 1 tokens; the rows of the
global batch of step s are a pure function of (seed, s): row r is window perm_e[(s·B + r) mod N]
of epoch e = (s·B + r) div N, with perm_e a seeded permutation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptjax.config import DataConfig
from gptjax.data import corpus
from gptjax.data import tokenizer as tok
from gptjax.data.corpus import DataError

FORMAT_VERSION = 1


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("GPTJAX_CACHE", "~/.cache/gptjax")).expanduser()


def _source_fingerprint(source: str) -> str:
    """Names, sizes and modification times of the source files (cheap; changes with content)."""
    if source == "stdlib":
        root, files = corpus.stdlib_root(), corpus.stdlib_files()
    elif source.startswith("text_dir:"):
        root = Path(source.removeprefix("text_dir:")).expanduser()
        if not root.is_dir():
            raise DataError(f"data directory not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix in corpus.TEXT_SUFFIXES)
    else:
        raise DataError(f"data.source={source!r} is not supported yet")
    digest = hashlib.sha256(str(root).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(cfg: DataConfig, tokenizer_bytes: bytes | None) -> str:
    parts = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "files": _source_fingerprint(cfg.source),
        "val_fraction": cfg.val_fraction,
        "tokenizer": hashlib.sha256(tokenizer_bytes).hexdigest() if tokenizer_bytes else None,
        "vocab_size": None if tokenizer_bytes else cfg.vocab_size,
        "sample_bytes": None if tokenizer_bytes else cfg.tokenizer_sample_bytes,
        "trainer": None if tokenizer_bytes else repr(sorted(tok.TRAINER_SETTINGS.items())),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _stream(tokenizer: tok.Tokenizer, docs: list[tuple[str, str]]) -> np.ndarray:
    """All documents' tokens, each followed by the end-of-document token, as one int32 array."""
    ids = tokenizer.encode_batch([text for _, text in docs])
    out = np.empty(sum(len(d) + 1 for d in ids), np.int32)
    at = 0
    for d in ids:
        out[at : at + len(d)] = d
        out[at + len(d)] = tok.EOD_ID
        at += len(d) + 1
    return out


def prepare(cfg: DataConfig, tokenizer_path: str | Path | None = None) -> Path:
    """Tokenise the corpus into the cache (reusing it when present); returns its directory."""
    tokenizer_path = tokenizer_path or cfg.tokenizer
    given = None
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise DataError(f"tokenizer not found: {tokenizer_path}")
        given = Path(tokenizer_path).read_bytes()
    target = cache_root(cfg) / cache_key(cfg, given)
    if (target / "meta.json").is_file():
        return target
    train_docs, val_docs = corpus.split(corpus.read_source(cfg.source), cfg.val_fraction)
    if given is None:
        model = tok.train((t for _, t in train_docs), cfg.vocab_size, cfg.tokenizer_sample_bytes)
    else:
        model = given
    tokenizer = tok.Tokenizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer.save(scratch / "tokenizer.model")
        train = _stream(tokenizer, train_docs)
        val = _stream(tokenizer, val_docs)
        np.save(scratch / "train.npy", train)
        np.save(scratch / "val.npy", val)
        meta = {
            "source": cfg.source,
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": int(train.size),
            "val_tokens": int(val.size),
            "vocab_size": tokenizer.vocab_size,
        }
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows [N, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""
    n = stream.size // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


@dataclass(eq=False)  # hashed by identity (the epoch-order cache)
class Dataset:
    tokenizer: tok.Tokenizer
    train: np.ndarray  # [N, seq_len + 1] int32
    val: np.ndarray  # [M, seq_len + 1] int32
    token_bytes: np.ndarray  # [vocab] UTF-8 bytes per token
    directory: Path

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a Dataset lives for the whole run
    def _order(self, seed: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        return rng.permutation(len(self.train))

    def train_rows(self, seed: int, step: int, batch_size: int, start: int, stop: int):
        """Rows [start, stop) of the global batch of `step`: int32 [stop - start, seq_len + 1]."""
        n = len(self.train)
        index = step * batch_size + np.arange(start, stop, dtype=np.int64)
        out = np.empty((stop - start, self.train.shape[1]), np.int32)
        for epoch in np.unique(index // n):
            here = index // n == epoch
            out[here] = self.train[self._order(seed, int(epoch))[index[here] % n]]
        return out

    def val_rows(self, eval_step: int, batch_size: int, start: int, stop: int) -> np.ndarray:
        """Rows of the fixed validation batch `eval_step` (the held-out windows, in order)."""
        index = eval_step * batch_size + np.arange(start, stop)
        return self.val[index % len(self.val)]

    def bytes_of(self, targets: np.ndarray) -> int:
        return int(self.token_bytes[targets].sum())


def load_dataset(cfg: DataConfig, seq_len: int, tokenizer_path: str | Path | None = None):
    directory = prepare(cfg, tokenizer_path)
    tokenizer = tok.Tokenizer.load(directory / "tokenizer.model")
    train = pack(np.load(directory / "train.npy"), seq_len)
    val = pack(np.load(directory / "val.npy"), seq_len)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"the corpus holds fewer than seq_len+1={seq_len + 1} tokens in train or validation"
        )
    return Dataset(tokenizer, train, val, tokenizer.token_bytes(), directory)
