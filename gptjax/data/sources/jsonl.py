"""`jsonl:GLOB[:FIELD]`: a string field of JSON-lines shards, plain, .gz or .zst (see
shards.py)."""

from __future__ import annotations

import gptjax.data.sources.shards as shards


def documents(argument: str):
    shards.jsonl_files(argument)  # fail now, not halfway through preparing
    return lambda: shards.jsonl_documents(argument)


def fingerprint(argument: str) -> str:
    return shards.fingerprint(argument, "jsonl")
