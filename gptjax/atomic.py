"""Files written whole: under a temporary name unique to the writer (process and thread), then
renamed over the target, so a reader sees the old file or the new one, never half of one, and
writers racing on one path never collide on the temporary name."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(scratch)` writes the whole file at a temporary path (same folder, same suffix),
    which then replaces `path`; a failed write leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        write(scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path


def write_file(path: str | Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        return write_with(path, lambda scratch: scratch.write_bytes(data))
    return write_with(path, lambda scratch: scratch.write_text(data))
