"""A batch is a dict of [B, T] int32 arrays, the same five keys from the loader to the step:

    inputs       token ids the model reads
    targets      the token to predict at each position (inputs shifted by one)
    loss_mask    1 where the target is scored, 0 where it is not (prompts, padding)
    segment_ids  which document each position belongs to; attention never crosses segments
    positions    each token's position inside its document (indexes the position table)

Packed windows of T + 1 tokens become batches here. `data.packing`:

- `concat` (the default, as GPT-2 and GPT-3 trained): documents follow each other separated by
  the end-of-document token, and attention runs across that token over the whole window. All of
  a window is one segment, positions are 0..T-1.
- `segments`: each document is its own segment, and its positions restart at 0, so a document
  inside a window is computed exactly as if it were alone. The end token belongs to the document
  it ends (its target, the next document's first token, is still scored).
"""

from __future__ import annotations

import numpy as np

from gptjax.config import PACKINGS

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def segments_and_positions(inputs: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1, 2, ... per row) and positions restarting after every end token."""
    ends = inputs == eod_id
    # a token starts a new document when the token before it was an end token
    starts = np.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    segment_ids = 1 + np.cumsum(starts, axis=1, dtype=np.int32)
    T = inputs.shape[1]
    index = np.broadcast_to(np.arange(T, dtype=np.int32), inputs.shape)
    start_of_segment = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return segment_ids.astype(np.int32), (index - start_of_segment).astype(np.int32)


def from_windows(
    windows: np.ndarray, eod_id: int, packing: str = "concat", loss_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The batch of packed windows [n, T + 1]; `loss_mask` [n, T + 1] (per window token, of the
    token as a target) defaults to scoring every target."""
    if packing not in PACKINGS:
        raise ValueError(f"packing {packing!r}: use one of {PACKINGS}")
    windows = np.asarray(windows, np.int32)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if packing == "segments":
        segment_ids, positions = segments_and_positions(inputs, eod_id)
    else:
        segment_ids = np.ones_like(inputs)
        positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
    mask = np.ones_like(targets) if loss_mask is None else np.asarray(loss_mask)[:, 1:]
    return {
        "inputs": np.ascontiguousarray(inputs),
        "targets": np.ascontiguousarray(targets),
        "loss_mask": mask.astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.ascontiguousarray(positions),
    }
