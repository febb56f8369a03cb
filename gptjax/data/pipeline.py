"""Prepared token data and step-indexed batches.

`prepare` turns a source into packed windows once, in three cached stages (each written under a
temporary name and renamed when complete, so nothing half-written is ever reused):

    cache/documents/KEY/   local sources as a TFDS ArrayRecord dataset     (array_records.py)
    cache/tokenizers/KEY.model   SentencePiece BPE trained on a capped sample of train documents
    cache/packed/KEY/      the tokenizer file (tokenizer.model or .json), train.array_record,
                           val.array_record, meta.json (+ train.mask.array_record and
                           val.mask.array_record for conversations)

The packed key covers the documents (source content), the tokenizer bytes and seq_len.
Conversation sources (gptjax/data/sources/__init__.py) are rendered with the chat template
(gptjax/data/chat.py) and store each window's loss mask beside it; their tokenizer, when trained
here, learns from the messages' text. Other sources score every target.

`Dataset.train_rows(seed, s, B, start, stop)` are rows [start, stop) of the global batch of step
s: global position p = s·B + r is window shuffle_e(p mod N) of epoch e = p div N, where
shuffle_e is grain's index_shuffle (a seeded bijection of [0, N), O(1) memory) with a seed
derived from (seed, e). So a batch is a pure function of (seed, s): any mesh, any host count,
resume at any step. Validation batches are the held-out windows in order.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gptjax.data.array_records as array_records
import gptjax.data.batching as batching
import gptjax.data.chat as chat
import gptjax.data.encode as encode
import gptjax.data.sharing as sharing
import gptjax.data.tokenizer as tok
from gptjax import atomic
from gptjax.config import DataConfig
from gptjax.data.corpus import DataError
from gptjax.data.packed import PackedWindows

FORMAT_VERSION = 2


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("GPTJAX_CACHE", "~/.cache/gptjax")).expanduser()


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _sample_texts(
    split: array_records.Split, conversations: bool = False, block: int = 256
) -> Iterator[str]:
    """Train documents in blocks of `block` records taken in a seeded random order (the words of
    conversations, not their JSON)."""
    n_blocks = -(-len(split) // block)
    for b in np.random.default_rng(0).permutation(n_blocks):
        texts = split.texts(np.arange(b * block, min((b + 1) * block, len(split))))
        yield from (map(chat.plain_text, texts) if conversations else texts)


def _is_chat(source: str) -> bool:
    from gptjax.data.sources import parse

    return parse(source)[0].conversations


def _capped(texts: Iterator[str], max_bytes: int) -> Iterator[str]:
    """`texts` until they hold `max_bytes` (UTF-8)."""
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        seen += len(text.encode())
        yield text


def _trained_tokenizer(
    cfg: DataConfig,
    weighted: list[tuple[array_records.Documents, float, bool]],
    root: Path,
    progress: bool = False,
) -> bytes:
    """Train the tokenizer on a capped sample of the train documents, or reuse the cached one.
    `weighted`: (documents, weight, are conversations) of each source; of several (a mixture),
    a sample of each in proportion to its weight."""
    parts = {
        "vocab_size": cfg.vocab_size,
        "sample_bytes": cfg.tokenizer_sample_bytes,
        "trainer": repr(sorted(tok.TRAINER_SETTINGS.items())),
    }
    if len(weighted) == 1:
        parts["documents"] = weighted[0][0].key
    else:
        parts["mixture"] = [[documents.key, weight] for documents, weight, _ in weighted]
    path = root / "tokenizers" / f"{_digest(parts)}.model"
    if path.is_file():
        return path.read_bytes()
    if progress:
        described = ", ".join(documents.description for documents, _, _ in weighted)
        print(
            f"gptjax: training a {cfg.vocab_size}-piece tokenizer on up to "
            f"{cfg.tokenizer_sample_bytes / 1e6:g} MB of {described}",
            file=sys.stderr,
        )
    total = sum(weight for _, weight, _ in weighted)
    samples = []
    for documents, weight, conversations in weighted:
        train_documents = documents.train  # written to the cache first, when local
        texts = _sample_texts(train_documents, conversations)
        if len(weighted) > 1:
            texts = _capped(texts, int(cfg.tokenizer_sample_bytes * weight / total))
        samples.append(texts)
    model = tok.train(itertools.chain(*samples), cfg.vocab_size, cfg.tokenizer_sample_bytes)
    atomic.write_file(path, model)
    return model


def _mask_path(path: Path) -> Path:
    """train.array_record -> train.mask.array_record"""
    return path.with_name(path.name.replace(".array_record", ".mask.array_record"))


def tokenizer_for(cfg: DataConfig, tokenizer_path, max_vocab, weighted, root, progress):
    """The given tokenizer, or the one trained on `weighted` (see _trained_tokenizer), checked
    against model.vocab_size (`max_vocab`)."""
    if tokenizer_path is not None:
        tokenizer = tok.load(tokenizer_path)
        where = str(tokenizer_path)
    else:
        if max_vocab is not None and cfg.vocab_size > max_vocab:
            raise DataError(
                f"data.vocab_size={cfg.vocab_size} does not fit model.vocab_size={max_vocab}; "
                "lower data.vocab_size or raise model.vocab_size"
            )
        tokenizer = tok.Tokenizer(_trained_tokenizer(cfg, weighted, root, progress))
        where = "the trained tokenizer"
    if max_vocab is not None and tokenizer.vocab_size > max_vocab:
        raise DataError(
            f"{where} has {tokenizer.vocab_size} pieces but model.vocab_size={max_vocab}; "
            f"raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    tokenizer.eod_id  # noqa: B018 - fails now if the model has no end-of-document piece
    return tokenizer


def prepare(
    cfg: DataConfig,
    seq_len: int,
    tokenizer_path: str | Path | None = None,
    max_vocab: int | None = None,
    progress: bool = False,
) -> Path:
    """Packed windows of seq_len + 1 tokens for `cfg.source` (reused when cached); returns the
    directory. `tokenizer_path` (else cfg.tokenizer) uses that model instead of training one;
    `max_vocab` (model.vocab_size) rejects a tokenizer with more pieces."""
    from gptjax.data.sources import check

    check(cfg)
    root = cache_root(cfg)
    documents = array_records.open_documents(cfg, root, progress)
    given = tokenizer_path or cfg.tokenizer
    weighted = [(documents, 1.0, _is_chat(cfg.source))]
    tokenizer = tokenizer_for(cfg, given, max_vocab, weighted, root, progress)
    return pack(cfg, seq_len, documents, tokenizer, root, progress)


def pack(cfg: DataConfig, seq_len: int, documents, tokenizer, root: Path, progress=False) -> Path:
    """The packed windows of `cfg.source`'s documents with `tokenizer` (reused when cached)."""
    key = {
        "format": FORMAT_VERSION,
        "documents": documents.key,
        "tokenizer": hashlib.sha256(tokenizer.model_bytes).hexdigest(),
        "seq_len": seq_len,
        "val_max_documents": cfg.val_max_documents,
    }
    conversations = _is_chat(cfg.source)
    if conversations:
        key["chat_template"] = chat.VERSION
    target = root / "packed" / _digest(key)
    if (target / "meta.json").is_file():
        if progress:  # nothing to prepare: say so (and where), not an empty bar
            print(f"gptjax: data: cached, nothing to prepare ({target})", file=sys.stderr)
        return target
    chunks = root / "packed" / f".chunks-{target.name}"  # kept when killed: resumed from
    total = len(documents.train) + min(len(documents.val), cfg.val_max_documents)
    bar = encode.progress_bar("tokenize", total, progress)
    workers = encode.workers_for(cfg.workers)

    def build(scratch: Path) -> None:
        started = time.perf_counter()
        tokenizer.save(scratch / tokenizer.filename)
        window = seq_len + 1
        counts = {}
        for split, name, limit in (
            (documents.train, "train", None),
            (documents.val, "val", cfg.val_max_documents),
        ):
            path = scratch / f"{name}.array_record"
            mask_path = _mask_path(path) if conversations else None
            counts[name] = encode.pack_split(
                split, limit, tokenizer, path, mask_path, window, chunks / name, workers, bar
            )
        train, val = counts["train"], counts["val"]
        for name, split in (("train", train), ("validation", val)):
            if split["windows"] == 0:
                raise DataError(
                    f"{documents.description}: the {name} split holds {split['tokens']} tokens, "
                    f"fewer than model.seq_len+1={window}; add text or lower model.seq_len"
                )
        seconds = time.perf_counter() - started
        meta = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "description": documents.description,
            "seq_len": seq_len,
            "vocab_size": tokenizer.vocab_size,
            "loss_mask": conversations,
            "train": train,
            "validation": val,
            "seconds": round(seconds, 3),
            "bytes_per_s": round((train["bytes"] + val["bytes"]) / seconds),
            "tokens_per_s": round((train["tokens"] + val["tokens"]) / seconds),
        }
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))

    try:
        directory = array_records.atomic_dir(target, build)
    except DataError:
        shutil.rmtree(chunks, ignore_errors=True)  # the input is wrong: nothing to resume
        raise
    finally:
        if bar is not None:
            bar.close()
    shutil.rmtree(chunks, ignore_errors=True)
    return directory


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


@dataclass(eq=False)
class Dataset:
    tokenizer: tok.TextTokenizer
    train: PackedWindows  # N windows of seq_len + 1 int32 tokens
    val: PackedWindows  # M held-out windows
    token_bytes: np.ndarray  # [vocab] UTF-8 bytes per token
    directory: Path
    meta: dict = field(default_factory=dict)
    packing: str = "concat"  # data.packing: how windows become batches
    train_mask: PackedWindows | None = None  # uint8 loss masks of the windows (conversations)
    val_mask: PackedWindows | None = None

    def window_ids(self, seed: int, rows: np.ndarray) -> np.ndarray:
        """Window of the run's j-th row for each j in `rows`: shuffle_e(j mod N) in epoch
        e = j div N (int64, like `rows`)."""
        from grain.experimental import index_shuffle  # lazy: grain takes ~2 s to import

        n = len(self.train)
        epochs, offsets = np.divmod(np.asarray(rows, np.int64), n)
        if n == 1:
            return offsets
        return np.array(
            [
                index_shuffle(int(o), max_index=n - 1, seed=_epoch_seed(seed, int(e)), rounds=4)
                for e, o in zip(epochs, offsets, strict=True)
            ],
            np.int64,
        )

    def train_indices(self, seed: int, step: int, batch_size: int, start: int, stop: int):
        """Window ids of rows [start, stop) of the global batch of `step`: int64 [stop - start]."""
        return self.window_ids(seed, step * batch_size + np.arange(start, stop, dtype=np.int64))

    def train_rows(self, seed: int, step: int, batch_size: int, start: int, stop: int):
        """Rows [start, stop) of the global batch of `step`: int32 [stop - start, seq_len + 1]."""
        return self.train.read(self.train_indices(seed, step, batch_size, start, stop))

    def val_indices(self, eval_step: int, batch_size: int, start: int, stop: int) -> np.ndarray:
        """Window ids of the fixed validation batch `eval_step` (the held-out windows, in order)."""
        return (eval_step * batch_size + np.arange(start, stop)) % len(self.val)

    def val_rows(self, eval_step: int, batch_size: int, start: int, stop: int) -> np.ndarray:
        return self.val.read(self.val_indices(eval_step, batch_size, start, stop))

    def train_batch(self, seed: int, step: int, batch_size: int, start: int, stop: int) -> dict:
        """Rows [start, stop) of the global batch of `step` as a batch dict (data/batching.py)."""
        windows = self.train_rows(seed, step, batch_size, start, stop)
        mask = None
        if self.train_mask is not None:
            mask = self.train_mask.read(self.train_indices(seed, step, batch_size, start, stop))
        return batching.from_windows(windows, self.tokenizer.eod_id, self.packing, mask)

    def val_batch(self, eval_step: int, batch_size: int, start: int, stop: int) -> dict:
        windows = self.val_rows(eval_step, batch_size, start, stop)
        mask = None
        if self.val_mask is not None:
            mask = self.val_mask.read(self.val_indices(eval_step, batch_size, start, stop))
        return batching.from_windows(windows, self.tokenizer.eod_id, self.packing, mask)


def load_dataset(
    cfg: DataConfig,
    seq_len: int,
    tokenizer_path: str | Path | None = None,
    max_vocab: int | None = None,
    progress: bool = False,
):
    """Prepare (or reuse) the packed windows and open them for random access: a Dataset, or for
    `data.mixture` a mixture.Mixture of one per source. With several processes, those sharing a
    cache directory prepare it once (gptjax/data/sharing.py)."""
    from gptjax.data.sources import check

    check(cfg)  # in every process, before any of them prepares
    directory = sharing.prepare_once(
        cache_root(cfg), lambda: prepare(cfg, seq_len, tokenizer_path, max_vocab, progress)
    )
    return open_prepared(directory, seq_len, cfg.packing)


def open_prepared(directory: Path, seq_len: int, packing: str = "concat") -> Dataset:
    """The Dataset of a prepared directory (what `prepare` returned)."""
    tokenizer = tok.load(directory)
    window = seq_len + 1
    train = PackedWindows(directory / "train.array_record", window)
    val = PackedWindows(directory / "val.array_record", window)
    meta = json.loads((directory / "meta.json").read_text())
    masks = [None, None]
    if meta.get("loss_mask"):
        masks = [
            PackedWindows(_mask_path(directory / f"{split}.array_record"), window, np.uint8)
            for split in ("train", "val")
        ]
    return Dataset(tokenizer, train, val, tokenizer.token_bytes(), directory, meta, packing, *masks)
