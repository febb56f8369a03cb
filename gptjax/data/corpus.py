"""Text sources. A corpus is a list of documents (name, text), split into train and validation
deterministically by the document's name, so the split never depends on the order of reading."""

from __future__ import annotations

import json
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

TEST_DIRS = {"test", "tests", "idle_test"}
TEXT_SUFFIXES = {".txt", ".md", ".jsonl"}


class DataError(ValueError):
    """A user mistake in the data (missing path, bad file); the message is one line."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The running Python's standard-library `.py` files, sorted (site-packages excluded)."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and TEST_DIRS.intersection(parts[:-1]):
            continue
        files.append(path)
    return files


def read_stdlib() -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 standard-library file outside the test suites."""
    root = stdlib_root()
    docs = []
    for path in stdlib_files():
        try:
            docs.append((str(path.relative_to(root)), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files are deliberately not UTF-8
    return docs


def _read_text_file(path: Path, root: Path) -> Iterator[tuple[str, str]]:
    name = str(path.relative_to(root))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte {error.start})") from None
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


def read_text_dir(root: str | Path) -> list[tuple[str, str]]:
    """Every .txt, .md and .jsonl (field `text`) file under `root`, UTF-8."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    docs = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            docs.extend(_read_text_file(path, root))
    if not docs:
        raise DataError(f"{root}: no .txt, .md or .jsonl files with text")
    return docs


def read_source(source: str) -> list[tuple[str, str]]:
    if source == "stdlib":
        return read_stdlib()
    if source.startswith("text_dir:"):
        return read_text_dir(source.removeprefix("text_dir:"))
    raise DataError(f"data.source={source!r} is not supported yet")


def is_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def split(
    docs: list[tuple[str, str]], val_fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train = [doc for doc in docs if not is_validation(doc[0], val_fraction)]
    val = [doc for doc in docs if is_validation(doc[0], val_fraction)]
    if not val:  # tiny corpora: hold out the last document
        train, val = train[:-1], train[-1:]
    if not train:
        raise DataError("the corpus is too small to split into train and validation")
    return train, val
