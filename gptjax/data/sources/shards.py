"""Corpora as they ship: many shards matched by a glob (FineWeb, Dolma, The Stack ship so).

`parquet:GLOB[:COLUMN]` reads the string column COLUMN (default `text`) of every `.parquet` file
matching GLOB (pyarrow, in the `corpora` extra), streamed a record batch at a time;
`jsonl:GLOB[:FIELD]` reads the string field FIELD (default `text`) of every line of every
`.jsonl`, `.jsonl.gz` or `.jsonl.zst` file matching GLOB (gzip from the standard library,
zstandard in the `corpora` extra), streamed a line at a time. Files are read in sorted order;
a document is named `FILE:ROW` (`FILE:LINE`), so the train/validation hash split never depends
on the order of reading. Memory stays bounded whatever the shard sizes.

An empty glob, a missing column, a shard that is not Parquet (checked when the source is
opened, from each file's footer), or a line that is not JSON or lacks the field (found while
reading) is one DataError naming the file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import gptjax.data.corpus as corpus
from gptjax.data.corpus import DataError

BATCH_ROWS = 1024  # Parquet rows read at a time


def split_argument(argument: str) -> tuple[str, str]:
    """(glob, column) of `GLOB[:COLUMN]`; a last part with a '/' is part of the glob."""
    pattern, colon, column = argument.rpartition(":")
    if not colon or not pattern or "/" in column or not column:
        return argument, "text"
    return pattern, column


def files(pattern: str, kind: str) -> tuple[Path, list[Path]]:
    """The files a glob matches (sorted) and their common directory; none is a DataError."""
    found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    found = [p for p in found if p.is_file()]
    if not found:
        raise DataError(f"{kind}:{pattern}: no files match")
    root = Path(os.path.commonpath([str(p.parent) for p in found]))
    return root, found


def fingerprint(argument: str, kind: str) -> str:
    pattern, column = split_argument(argument)
    return corpus.fingerprint_files(*files(pattern, kind)) + f":{column}"


# --- Parquet -------------------------------------------------------------------------------


def _pyarrow():
    try:
        import pyarrow.parquet as pq  # lazy: only these sources need it
    except ImportError:
        raise DataError(
            "parquet: sources need pyarrow: pip install pyarrow (or pip install 'gptjax[corpora]')"
        ) from None
    return pq


def open_parquet(path: Path, column: str):
    """The ParquetFile of a shard, checked: readable, with a string column `column`."""
    pq = _pyarrow()
    import pyarrow as pa

    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        reason = str(error).splitlines()[0][:200]
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    schema = shard.schema_arrow
    if column not in schema.names:
        raise DataError(
            f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
            "name it as parquet:GLOB:COLUMN"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not text")
    return shard


def parquet_documents(argument: str) -> Iterator[tuple[str, str]]:
    pattern, column = split_argument(argument)
    root, shards = files(pattern, "parquet")
    import pyarrow as pa

    for path in shards:
        name = str(path.relative_to(root))
        row = 0
        try:
            for batch in open_parquet(path, column).iter_batches(BATCH_ROWS, columns=[column]):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield f"{name}:{row}", text
                    row += 1
        except (pa.ArrowException, OSError) as error:
            reason = str(error).splitlines()[0][:200]
            raise DataError(f"{path}: unreadable after row {row} ({reason})") from None


def check_parquet(argument: str) -> None:
    """Every shard opens and has the column (footers only), before anything is written."""
    pattern, column = split_argument(argument)
    for path in files(pattern, "parquet")[1]:
        open_parquet(path, column)


# --- JSON lines ------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def _zstandard():
    try:
        import zstandard  # lazy: only .zst shards need it
    except ImportError:
        raise DataError(
            ".jsonl.zst shards need zstandard: pip install zstandard "
            "(or pip install 'gptjax[corpora]')"
        ) from None
    return zstandard


def _zst_bytes(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a .zst file (any number of frames); a file cut inside a frame
    is an error (zstandard's stream reader would end there silently)."""
    zstandard = _zstandard()
    context = zstandard.ZstdDecompressor()
    frame, inside = context.decompressobj(), False
    with open(path, "rb") as raw:
        while block := raw.read(1 << 20):
            while block:
                inside = True
                yield frame.decompress(block)
                if not frame.eof:
                    break
                block, frame, inside = frame.unused_data, context.decompressobj(), False
    if inside:
        raise EOFError("the file ends inside a zstd frame (truncated)")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a .jsonl, .jsonl.gz or .jsonl.zst file, streamed, decoded as UTF-8."""
    if path.name.endswith(".zst"):
        rest = b""
        for data in _zst_bytes(path):
            *whole, rest = (rest + data).split(b"\n")
            yield from (line.decode("utf-8") for line in whole)
        if rest:
            yield rest.decode("utf-8")
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        yield from file


def _zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:
        return ValueError
    return zstandard.ZstdError


def jsonl_files(argument: str) -> tuple[Path, list[Path], str]:
    pattern, field = split_argument(argument)
    root, found = files(pattern, "jsonl")
    other = [p for p in found if not p.name.endswith(JSONL_SUFFIXES)]
    if other:
        raise DataError(f"{other[0]}: not {', '.join(JSONL_SUFFIXES)} (jsonl:GLOB)")
    return root, found, field


def jsonl_documents(argument: str) -> Iterator[tuple[str, str]]:
    root, found, field = jsonl_files(argument)
    for path in found:
        name = str(path.relative_to(root))
        number = 0
        try:
            for number, line in enumerate(_lines(path), 1):  # noqa: B007 - used in the error
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{number}: not valid JSON") from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no string field {field!r}")
                if text:
                    yield f"{name}:{number}", text
        except DataError:
            raise
        except (OSError, EOFError, UnicodeDecodeError, ValueError, _zstd_error()) as error:
            # a corrupt .gz (BadGzipFile is an OSError), a cut .zst (ZstdError), not UTF-8
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise DataError(f"{path}: unreadable after line {number} ({reason})") from None
