"""Local text sources, read lazily as documents (name, text).

`stdlib` is the running Python's standard library (`.py` files outside the test suites);
`text_dir:PATH` is every `.txt`, `.md` and `.jsonl` (string field `text`, one document per line)
file under PATH, UTF-8. Documents go to train or validation by a hash of their name, so the split
never depends on the order of reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

TEST_DIRS = {"test", "tests", "idle_test"}
TEXT_SUFFIXES = {".txt", ".md", ".jsonl"}

Document = tuple[str, str]  # (name, text)


class DataError(ValueError):
    """A user mistake in the data (missing path, bad file); the message is one line."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The running Python's standard-library `.py` files, sorted (site-packages excluded)."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= TEST_DIRS
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # prune: never walk site-packages
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def iter_stdlib() -> Iterator[Document]:
    """(relative path, text) of every UTF-8 standard-library file outside the test suites."""
    root = stdlib_root()
    for path in stdlib_files():
        try:
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files are deliberately not UTF-8


def text_dir_files(root: str | Path) -> tuple[Path, list[Path]]:
    """The directory and its text files, sorted; a missing or empty directory is a DataError."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no .txt, .md or .jsonl files")
    return root, files


def _read_text_file(path: Path, root: Path) -> Iterator[Document]:
    name = str(path.relative_to(root))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte {error.start}); convert or remove it") from None
    if path.suffix != ".jsonl":
        yield name, text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: no string field 'text'")
        yield f"{name}:{number}", record["text"]


def iter_text_dir(root: str | Path) -> Iterator[Document]:
    """Every document under `root` (see the module docstring), in sorted file order."""
    root, files = text_dir_files(root)
    for path in files:
        yield from _read_text_file(path, root)


def fingerprint_files(root: Path, files: list[Path]) -> str:
    """Names, sizes and modification times of `files` under `root`: changes with content."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def split_documents(
    documents: Iterator[Document], val_fraction: float, want_validation: bool
) -> Iterator[Document]:
    """One side of the train/validation split of `documents` (non-empty texts only), streaming.

    Validation documents are those whose name hashes under `val_fraction`; when none does (tiny
    corpora) the last document is held out instead. Train is one document behind so it can give
    that document up.
    """
    held: Document | None = None
    any_validation = False
    for name, text in documents:
        if not text:
            continue
        if is_validation(name, val_fraction):
            any_validation = True
            if want_validation:
                yield name, text
            continue
        if not want_validation and held is not None:
            yield held
        held = (name, text)
    if held is None:
        return
    if want_validation and not any_validation:
        yield held
    if not want_validation and any_validation:
        yield held
