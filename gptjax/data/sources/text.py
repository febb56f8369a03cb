"""`text:FILE`: one text file, cut into pieces at line ends (see gptjax/data/corpus.py)."""

from __future__ import annotations

import gptjax.data.corpus as corpus


def documents(argument: str):
    path = corpus.text_file(argument)  # fail now, not halfway through preparing
    return lambda: corpus.iter_text_file(path)


def fingerprint(argument: str) -> str:
    path = corpus.text_file(argument).resolve()
    return corpus.fingerprint_files(path.parent, [path])


def describe_split(argument: str, train: int, validation: int) -> str:
    return corpus.describe_pieces(corpus.text_file(argument), train, validation)
