"""`parquet:GLOB[:COLUMN]`: the text column of Parquet shards (see shards.py)."""

from __future__ import annotations

import gptjax.data.sources.shards as shards


def documents(argument: str):
    shards.check_parquet(argument)  # fail now, not halfway through preparing
    return lambda: shards.parquet_documents(argument)


def fingerprint(argument: str) -> str:
    return shards.fingerprint(argument, "parquet")
