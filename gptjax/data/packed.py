"""Packed token windows on disk: one ArrayRecord record per window of seq_len + 1 int32 tokens.

Documents are concatenated, each followed by the end-of-document token, and cut into
non-overlapping windows (inputs are window[:-1], targets window[1:]); the tail that does not fill
a window is dropped. Records are uncompressed with group_size 1, so any window is one read, and
`PackedWindows.read` fetches many in one call (ArrayRecord's batched, parallel read).
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
    """Packs token lists into windows of `window` int32 tokens, appended to an ArrayRecord."""

    def __init__(self, path: str | Path, window: int, eod_id: int):
        self.window = window
        self.eod_id = eod_id
        self.windows = 0  # written so far
        self.tokens = 0  # tokens seen (documents + end-of-document tokens)
        self._carry = np.empty(0, np.int32)
        self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)

    def add(self, documents: Sequence[Sequence[int]]) -> None:
        """Append documents (token ids, without end-of-document tokens)."""
        sizes = np.fromiter((len(d) + 1 for d in documents), np.int64, len(documents))
        stream = np.empty(len(self._carry) + int(sizes.sum()), np.int32)
        stream[: len(self._carry)] = self._carry
        at = len(self._carry)
        for ids in documents:
            stream[at : at + len(ids)] = ids
            stream[at + len(ids)] = self.eod_id
            at += len(ids) + 1
        self.tokens += int(sizes.sum())
        full = len(stream) // self.window
        for row in stream[: full * self.window].reshape(full, self.window):
            self._writer.write(row.tobytes())
        self.windows += full
        self._carry = stream[full * self.window :].copy()

    def close(self) -> None:
        self._writer.close()


class PackedWindows:
    """Random access to packed windows: `read(indices)` -> int32 [len(indices), window].

    Also a grain random-access data source (`len`, `[i]`). Thread-safe.
    """

    def __init__(self, path: str | Path, window: int):
        self.path = Path(path)
        self.window = window
        self._reader = ArrayRecordReader(str(path), READER_OPTIONS)
        self._length = int(self._reader.num_records())
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(np.array([index]))[0]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Windows `indices` (any order, repeats allowed) as int32 [len(indices), window]."""
        indices = np.asarray(indices, np.int64)
        if indices.size == 0:
            return np.empty((0, self.window), np.int32)
        if indices.min() < 0 or indices.max() >= self._length:
            raise IndexError(f"window index out of range [0, {self._length})")
        with self._lock:
            records = self._reader.read([int(i) for i in indices])
        out = np.frombuffer(b"".join(records), np.int32)
        return out.reshape(len(indices), self.window)

    def close(self) -> None:
        self._reader.close()
