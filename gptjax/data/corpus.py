"""Local text sources, read lazily as documents (name, text).

`stdlib` is the running Python's standard library (`.py` files outside the test suites);
`text_dir:PATH` is every `.txt`, `.md` and `.jsonl` (string field `text`, one document per line)
file under PATH, UTF-8; `text:FILE` is one text file. Documents go to train or validation by a
hash of their name, so the split never depends on the order of reading.

One file (`text:FILE`, or a `text_dir` holding a single `.txt`/`.md` file: a book, a log, the
usual `input.txt`) is cut into about PIECES pieces (at most PIECE_MAX bytes each, so a large file
gives more) that end at line ends, named `NAME#k`; the hash split then holds out whole pieces.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from gptjax.errors import UserError

TEST_DIRS = {"test", "tests", "idle_test"}
TEXT_SUFFIXES = {".txt", ".md", ".jsonl"}

PIECES = 64  # a lone file is cut into about this many pieces ...
PIECE_MAX = 1 << 20  # ... of at most this many characters (plus the rest of the last line)

Document = tuple[str, str]  # (name, text)


class DataError(UserError, ValueError):
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


def text_file(path: str | Path) -> Path:
    """The file of a `text:FILE` source; a missing path or a directory is a DataError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path} (for a directory use data.source=text_dir:{path})")
    return path


def piece_bytes(size: int) -> int:
    """Bytes per piece of a lone file of `size` bytes: about PIECES pieces, each at most
    PIECE_MAX bytes (plus the rest of its last line)."""
    return min(PIECE_MAX, max(1, size // PIECES))


def iter_text_file(path: str | Path, name: str | None = None) -> Iterator[Document]:
    """One UTF-8 text file as pieces ("NAME#k", text) of `piece_bytes` bytes and on to the end
    of the line (at most twice that), streamed: a file larger than memory is fine."""
    path = text_file(path)
    name = name or path.name
    size = piece_bytes(path.stat().st_size)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file read so far
    with path.open("rb") as file:
        for k in itertools.count():
            raw = file.read(size)
            if raw:
                raw += file.readline(size)  # on to the line end (b"\n" never splits a character)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the limit
            try:
                piece = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                byte = offset - pending + error.start
                raise DataError(f"{path}: not UTF-8 (byte {byte}); convert or remove it") from None
            offset += len(raw)
            if piece:
                yield f"{name}#{k}", piece
            if not raw:
                return


def describe_pieces(path: Path, train: int, validation: int) -> str:
    """One line: how a lone file was split into documents."""
    size = path.stat().st_size
    return (
        f"{path} is one file ({size:,} bytes): cut into {train + validation} pieces of "
        f"{piece_bytes(size):,}+ bytes ending at line ends; {validation} whole pieces held out "
        "for validation (by a hash of their names, data.val_fraction)"
    )


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


def is_lone_file(files: list[Path]) -> bool:
    """A text_dir of one text file (cut into pieces like `text:FILE`)."""
    return len(files) == 1 and files[0].suffix != ".jsonl"


def iter_text_dir(root: str | Path) -> Iterator[Document]:
    """Every document under `root` (see the module docstring), in sorted file order."""
    root, files = text_dir_files(root)
    if is_lone_file(files):
        yield from iter_text_file(files[0], str(files[0].relative_to(root)))
        return
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
