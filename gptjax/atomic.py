"""Files written whole: under a temporary name unique to the writer (process and thread), then
renamed over the target, so a reader sees the old file or the new one, never half of one, and
writers racing on one path never collide on the temporary name."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_file(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    if isinstance(data, bytes):
        scratch.write_bytes(data)
    else:
        scratch.write_text(data)
    os.replace(scratch, path)
    return path
