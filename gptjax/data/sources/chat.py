"""`chat:PATH`: conversations in JSONL, one per line, `{"messages": [{"role", "content"}, ...]}`
(roles system/user/assistant; the common fine-tuning format). PATH is a `.jsonl` file or a
directory whose `.jsonl` files are read in sorted order. Every line is checked when the source is
opened, so a bad line is one DataError (path:line) before anything is written."""

from __future__ import annotations

from pathlib import Path

import gptjax.data.chat as chat
import gptjax.data.corpus as corpus
from gptjax.data.corpus import DataError


def _files(argument: str) -> tuple[Path, list[Path]]:
    path = Path(argument).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path}: no .jsonl files")
        return path, files
    raise DataError(f"chat data not found: {path}")


def _read(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    documents = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 (byte {error.start})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            _, messages = chat.parse_record(line, where)
            documents.append((f"{path.relative_to(root)}:{number}", chat.to_json(messages)))
    if not documents:
        raise DataError(f"{root}: no conversations")
    return documents


def documents(argument: str):
    found = _read(*_files(argument))  # checked now, not halfway through preparing
    return lambda: iter(found)


def fingerprint(argument: str) -> str:
    return corpus.fingerprint_files(*_files(argument))
