"""Packed token windows on disk: one ArrayRecord record per window of seq_len + 1 int32 tokens.

Documents are concatenated, each followed by the end-of-document token, and cut into
non-overlapping windows (inputs are window[:-1], targets window[1:]); the tail that does not fill
a window is dropped. Records are uncompressed with group_size 1, so any window is one read, and
`PackedWindows.read` fetches many in one call (ArrayRecord's batched, parallel read).

Documents with a loss mask (conversations: 1 where a token is scored as a target) also write a
second ArrayRecord with the same layout, one uint8 per token (the end-of-document token gets 0).
Without one every target is scored (pretraining).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0,index_storage_option:in_memory"


class WindowWriter:
    """Packs token lists into windows of `window` int32 tokens, appended to an ArrayRecord;
    with `mask_path`, their loss masks into a second one (every `add` then gives masks)."""

    def __init__(
        self, path: str | Path, window: int, eod_id: int, mask_path: str | Path | None = None
    ):
        self.window = window
        self.eod_id = eod_id
        self.windows = 0  # written so far
        self.tokens = 0  # tokens seen (documents + end-of-document tokens)
        self.scored = 0  # tokens whose mask is 1
        self._streams = [_Stream(path, np.int32)]
        if mask_path is not None:
            self._streams.append(_Stream(mask_path, np.uint8))

    def add(
        self,
        documents: Sequence[Sequence[int]],
        masks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append documents (token ids, without end-of-document tokens) and, when this writer
        has a mask file, their loss masks (one 0/1 per token)."""
        if (masks is None) != (len(self._streams) == 1):
            raise ValueError("give masks exactly when the writer was opened with a mask_path")
        self.tokens += sum(len(d) + 1 for d in documents)
        full = self._streams[0].add(documents, self.eod_id, self.window)
        if masks is not None:
            self.scored += sum(int(np.sum(m)) for m in masks)
            self._streams[1].add(masks, 0, self.window)
        self.windows += full

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


class _Stream:
    """One ArrayRecord of fixed-size windows cut from a stream of documents + separators."""

    def __init__(self, path: str | Path, dtype):
        self.dtype = dtype
        self._carry = np.empty(0, dtype)
        self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)

    def add(self, documents: Sequence[Sequence[int]], separator: int, window: int) -> int:
        """Append documents, each followed by `separator`; returns the windows written."""
        size = len(self._carry) + sum(len(d) + 1 for d in documents)
        stream = np.empty(size, self.dtype)
        stream[: len(self._carry)] = self._carry
        at = len(self._carry)
        for ids in documents:
            stream[at : at + len(ids)] = ids
            stream[at + len(ids)] = separator
            at += len(ids) + 1
        full = len(stream) // window
        for row in stream[: full * window].reshape(full, window):
            self._writer.write(row.tobytes())
        self._carry = stream[full * window :].copy()
        return full

    def close(self) -> None:
        self._writer.close()


class PackedWindows:
    """Random access to packed windows: `read(indices)` -> [len(indices), window] of `dtype`
    (int32 tokens, or uint8 loss masks).

    Also a grain random-access data source (`len`, `[i]`). Thread-safe.
    """

    def __init__(self, path: str | Path, window: int, dtype=np.int32):
        self.path = Path(path)
        self.window = window
        self.dtype = np.dtype(dtype)
        self._reader = ArrayRecordReader(str(path), READER_OPTIONS)
        self._length = int(self._reader.num_records())
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(np.array([index]))[0]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Windows `indices` (any order, repeats allowed) as [len(indices), window]."""
        indices = np.asarray(indices, np.int64)
        if indices.size == 0:
            return np.empty((0, self.window), self.dtype)
        if indices.min() < 0 or indices.max() >= self._length:
            raise IndexError(f"window index out of range [0, {self._length})")
        with self._lock:
            records = self._reader.read([int(i) for i in indices])
        out = np.frombuffer(b"".join(records), self.dtype)
        return out.reshape(len(indices), self.window)

    def close(self) -> None:
        self._reader.close()
