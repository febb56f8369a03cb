"""`stdlib`: the running Python's standard-library `.py` files (test suites left out)."""

from __future__ import annotations

import gptjax.data.corpus as corpus


def documents(argument: str):
    del argument
    return corpus.iter_stdlib


def fingerprint(argument: str) -> str:
    del argument
    return corpus.fingerprint_files(corpus.stdlib_root(), corpus.stdlib_files())
