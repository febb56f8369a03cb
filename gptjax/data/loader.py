"""From rows to global arrays: each process reads only its own rows, ahead of time.

`row_ranges` says which rows of a [batch, ...] global array a set of devices (by default this
process's) holds under a sharding; `assemble` reads exactly those rows once and builds the
global array with `jax.make_array_from_process_local_data` (the process-local data is the
concatenation of its unique row blocks in order, which is how JAX maps it back). `Prefetcher`
builds the batches of the next steps in a background thread while the current step runs.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

RowsFn = Callable[[int, int], np.ndarray]  # (start, stop) -> rows [stop - start, ...]


def row_ranges(
    sharding: jax.sharding.Sharding,
    global_shape: tuple[int, ...],
    devices: Sequence[jax.Device] | None = None,
) -> list[tuple[int, int]]:
    """Sorted, merged [start, stop) row blocks held by `devices` (default: this process's)."""
    held = sharding.devices_indices_map(global_shape)
    if devices is None:
        devices = [d for d in held if d.process_index == jax.process_index()]
    batch = global_shape[0]
    blocks = sorted({held[d][0].indices(batch)[:2] for d in devices})
    merged: list[list[int]] = []
    for start, stop in blocks:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def local_rows(rows_fn: RowsFn, ranges: Sequence[tuple[int, int]]) -> Any:
    """The rows of `ranges`, concatenated in order (each read exactly once). `rows_fn` returns
    an array or a dict of arrays (a batch); so does this."""
    parts = [rows_fn(start, stop) for start, stop in ranges]
    return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)


def assemble(
    sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], rows_fn: RowsFn
) -> Any:
    """The global [batch, ...] array (or dict of arrays, each with `sharding` on its leading
    batch axis); this process reads only the rows its devices hold."""
    rows = local_rows(rows_fn, row_ranges(sharding, global_shape))
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            sharding, a, (global_shape[0], *a.shape[1:])
        ),
        rows,
    )


class Prefetcher:
    """`get(step)` returns `build(step)`, building steps step+1 .. step+depth in the background.

    Steps are asked for in increasing order (any start, e.g. a resumed step); a step asked out
    of order is built on the spot. `stop` (exclusive) bounds what is built ahead.
    """

    def __init__(self, build: Callable[[int], Any], depth: int = 2, stop: int | None = None):
        self.build = build
        self.depth = depth
        self.stop = stop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gptjax-data")
        self._pending: dict[int, concurrent.futures.Future] = {}

    def get(self, step: int) -> Any:
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        ahead = range(step, step + self.depth + 1)
        for s in ahead if self.depth else ():
            if s not in self._pending and (self.stop is None or s < self.stop):
                self._pending[s] = self._pool.submit(self.build, s)
        future = self._pending.pop(step, None)
        return future.result() if future is not None else self.build(step)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
