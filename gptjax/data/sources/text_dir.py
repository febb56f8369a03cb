"""`text_dir:PATH`: every .txt, .md and .jsonl file under PATH (see gptjax/data/corpus.py); one
file alone is cut into pieces like `text:FILE`."""

from __future__ import annotations

import gptjax.data.corpus as corpus


def documents(argument: str):
    corpus.text_dir_files(argument)  # fail now, not halfway through preparing
    return lambda: corpus.iter_text_dir(argument)


def fingerprint(argument: str) -> str:
    root, files = corpus.text_dir_files(argument)
    return corpus.fingerprint_files(root, files)


def describe_split(argument: str, train: int, validation: int) -> str | None:
    files = corpus.text_dir_files(argument)[1]
    return (
        corpus.describe_pieces(files[0], train, validation) if corpus.is_lone_file(files) else None
    )
