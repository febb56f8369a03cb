"""Tokenising one split into packed windows: in chunks, on every core, resumable.

The split's documents are read in record order and cut into chunks (at most CHUNK_DOCUMENTS
documents or CHUNK_BYTES of text, whichever comes first, decided while reading, so the same
documents always give the same chunks). Each chunk is tokenised, in this process (`workers=1`:
SentencePiece's own threads, the serial path) or in one of `workers` processes, into a chunk
file `CHUNKS/NNNNNN.npz` (tokens, document lengths, loss masks for conversations, and the
records it covers), written under a temporary name and renamed. The windows are then packed from
the chunk files in order, so the output is byte-identical whatever the number of workers; at
most 2 x workers chunks are in flight, so memory stays bounded whatever the corpus size. Within
a chunk the tokenizer gets ENCODE_DOCUMENTS documents / ENCODE_BYTES at a time and its token
lists become int32 arrays at once (a chunk's tokens as Python ints would be ~40 bytes each).

A preparation killed half-way leaves its completed chunk files; the next one skips those chunks
(their documents are not even read) and tokenises only the rest. The chunk directory is deleted
once the packed windows are complete (pipeline.py).

Why training cannot start on the first chunks: the order of step s's rows is an epoch shuffle of
all N windows of a source (pipeline.Dataset), and N is known only once every chunk is packed; a
batch that read from a partial set of windows would depend on how far preparation had got.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import gptjax.data.tokenizer as tok
from gptjax.data.packed import WindowWriter

CHUNK_DOCUMENTS = 1024
CHUNK_BYTES = 8 << 20
READ_RECORDS = 64  # records read from the documents per call
ENCODE_DOCUMENTS = 64  # documents given to the tokenizer per call
ENCODE_BYTES = 1 << 20  # ... or this many characters, whichever comes first

_worker: dict = {}  # in a worker process: its tokenizer and chat template


def workers_for(configured: int) -> int:
    """data.workers: 0 means one per CPU core."""
    return configured or os.cpu_count() or 1


def progress_bar(desc: str, total: int, enabled: bool = True):
    """The preparation's progress bar (documents done, rate, ETA), or None when not shown."""
    if not enabled:
        return None
    from gptjax import progress

    return progress.bar(desc, total=total, unit="doc", leave=False)


def _setup(filename: str, model: bytes, conversations: bool, threads: int | None) -> None:
    """Tokenizer (and chat template) of this process, built once from the model's bytes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers: no thread pool
    tokenizer = tok.from_bytes(filename, model)
    if threads is not None and hasattr(tokenizer, "threads"):
        tokenizer.threads = threads
    _worker["tokenizer"] = tokenizer
    _worker["template"] = None  # set for every preparation: this process may have done others
    if conversations:
        import gptjax.data.chat as chat

        _worker["template"] = chat.Template(tokenizer)


def encode_batches(texts: list[str]) -> Iterator[list[str]]:
    """`texts` in consecutive slices of at most ENCODE_DOCUMENTS documents or ENCODE_BYTES
    characters (a longer document alone): what the tokenizer gets per call, so the token lists
    it returns (Python ints, ~40 bytes each) stay small however large the chunk."""
    start = size = 0
    for i, text in enumerate(texts):
        if i > start and (i - start >= ENCODE_DOCUMENTS or size + len(text) > ENCODE_BYTES):
            yield texts[start:i]
            start, size = i, 0
        size += len(text)
    if start < len(texts):
        yield texts[start:]


def encode_chunk(texts: list[str], records: tuple[int, int], path: str) -> dict:
    """Tokenise `texts` (records [start, stop) of the split) into the chunk file `path`;
    returns its counts."""
    template = _worker.get("template")
    documents: list[np.ndarray] = []  # int32 token ids of each document
    masks: list[np.ndarray] | None = None if template is None else []
    for batch in encode_batches(texts):
        if template is None:
            encoded = _worker["tokenizer"].encode_batch(batch)
            documents += [np.asarray(ids, np.int32) for ids in encoded]
            del encoded  # before the next batch is encoded
        else:
            import gptjax.data.chat as chat

            for ids, mask in template.render_many([chat.from_json(t) for t in batch]):
                documents.append(np.asarray(ids, np.int32))
                masks.append(np.asarray(mask, np.uint8))
    arrays = {
        "tokens": np.concatenate(documents or [np.empty(0, np.int32)]),
        "lengths": np.array([len(d) for d in documents], np.int64),
        "records": np.array(records, np.int64),
        "bytes": np.array(sum(len(t.encode()) for t in texts), np.int64),
    }
    del documents
    if masks is not None:
        arrays["masks"] = np.concatenate(masks or [np.empty(0, np.uint8)])
    scratch = Path(path).with_name(f".tmp-{os.getpid()}-{Path(path).name}")
    with open(scratch, "wb") as file:
        np.savez(file, **arrays)
    os.replace(scratch, path)
    return {"documents": len(texts), "bytes": int(arrays["bytes"])}


def _chunk_path(chunks: Path, k: int) -> Path:
    return chunks / f"{k:06d}.npz"


def _read_chunks(split, limit: int | None, chunks: Path):
    """(k, texts or None when chunk k is already done, (start, stop)) in order; a done chunk's
    documents are not read."""
    length = len(split)
    start, k, seen = 0, 0, 0
    while start < length and (limit is None or seen < limit):
        done = _chunk_path(chunks, k)
        if done.is_file():
            with np.load(done) as stored:
                first, stop = (int(x) for x in stored["records"])
                count = len(stored["lengths"])
            if first == start:
                yield k, None, (start, stop)
                start, k, seen = stop, k + 1, seen + count
                continue
        texts: list[str] = []
        size, stop = 0, start
        while stop < length and len(texts) < CHUNK_DOCUMENTS and size < CHUNK_BYTES:
            step = min(READ_RECORDS, CHUNK_DOCUMENTS - len(texts), length - stop)
            got = split.texts(np.arange(stop, stop + step, dtype=np.int64))
            stop += step
            if limit is not None:
                got = got[: limit - seen - len(texts)]
            texts += got
            size += sum(len(t) for t in got)
            if limit is not None and seen + len(texts) >= limit:
                break
        yield k, texts, (start, stop)
        start, k, seen = stop, k + 1, seen + len(texts)


def pack_split(
    split,
    limit: int | None,
    tokenizer,
    path: Path,
    mask_path: Path | None,
    window: int,
    chunks: Path,
    workers: int = 1,
    bar=None,
) -> dict:
    """Tokenise and pack one split into `path` (and its loss masks into `mask_path` for
    conversations), through chunk files in `chunks`; returns the split's counts."""
    chunks.mkdir(parents=True, exist_ok=True)
    conversations = mask_path is not None
    writer = WindowWriter(path, window, tokenizer.eod_id, mask_path)
    n_docs = n_bytes = 0
    pool = None
    _setup(tokenizer.filename, tokenizer.model_bytes, conversations, None)

    def start_pool() -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a process running JAX
            initializer=_setup,
            initargs=(tokenizer.filename, tokenizer.model_bytes, conversations, 1),
        )

    pending: deque = deque()  # (k, future or None) in chunk order

    def pack_oldest() -> None:
        nonlocal n_docs, n_bytes
        k, future = pending.popleft()
        if future is not None:
            future.result()
        with np.load(_chunk_path(chunks, k)) as stored:
            lengths, tokens = stored["lengths"], stored["tokens"]
            documents = np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
            masks = None
            if conversations:
                masks = np.split(stored["masks"], np.cumsum(lengths)[:-1]) if len(lengths) else []
            writer.add(documents, masks)
            n_docs, n_bytes = n_docs + len(lengths), n_bytes + int(stored["bytes"])
            if bar is not None:
                bar.update(len(lengths))

    held = None  # the first chunk to tokenise: a pool starts only when a second one comes
    try:
        for k, texts, records in _read_chunks(split, limit, chunks):
            future = None
            if texts is not None:
                target = str(_chunk_path(chunks, k))
                if workers > 1 and pool is None and held is None:
                    held = (k, texts, records, target)
                    continue
                if workers > 1 and pool is None:
                    pool = start_pool()
                    first = pool.submit(encode_chunk, *held[1:])
                    pending.append((held[0], first))
                    held = None
                if pool is None:
                    encode_chunk(texts, records, target)
                else:
                    future = pool.submit(encode_chunk, texts, records, target)
            if held is not None:  # a done chunk after the held one: tokenise it here first
                encode_chunk(*held[1:])
                pending.append((held[0], None))
                held = None
            pending.append((k, future))
            while pending and (len(pending) > 2 * workers or _ready(pending[0][1])):
                pack_oldest()
        if held is not None:  # one chunk only: no pool for it
            encode_chunk(*held[1:])
            pending.append((held[0], None))
        while pending:
            pack_oldest()
    finally:
        for _, future in pending:
            if future is not None:
                future.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    counts = {"documents": n_docs, "bytes": n_bytes, "tokens": writer.tokens}
    counts["windows"] = writer.windows
    if conversations:
        counts["scored_tokens"] = writer.scored
    return counts


def _ready(future) -> bool:
    return future is None or future.done()
