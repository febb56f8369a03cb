"""Every data source, registered in one table.

`data.source` is `NAME` or `NAME:ARGUMENT`. Each entry names the module that implements it
(imported only when the source is used). A source module provides one of:

- local sources (read from files here, written once into the document cache):
    `documents(argument) -> callable` returning a fresh iterator of (name, text) documents,
    checking the argument at once (a missing path is a DataError now, not halfway through);
    `fingerprint(argument) -> str`, which changes whenever the content may have changed;
    optionally `describe_split(argument, train, validation) -> str | None`, a line said once
    the documents are written (how a source that is not a set of documents was split);
- prepared sources (already stored as a dataset elsewhere):
    `open(argument, cfg: DataConfig) -> gptjax.data.array_records.Documents`.

A conversation source (`conversations=True`) yields documents whose text is a conversation as
JSON (gptjax/data/chat.py): they are rendered with the chat template and packed with a loss mask.
A pairs source (`pairs=True`: `prefs`) is read by gptjax/data/prefs.py: one row per reply, never
packed, so any data.packing does.

Adding a source is one new module in this folder and one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from gptjax.config import DataConfig
from gptjax.data.corpus import DataError


@dataclass(frozen=True)
class Source:
    module: str  # implementing module, imported on use
    argument: str | None  # what follows "NAME:" (None: the source takes no argument)
    summary: str
    conversations: bool = False  # documents are JSON conversations (chat template, loss mask)
    pairs: bool = False  # preference pairs (gptjax/data/prefs.py), not documents: never packed

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


SOURCES: dict[str, Source] = {
    "stdlib": Source(
        "gptjax.data.sources.stdlib", None, "the running Python's standard library (.py)"
    ),
    "text_dir": Source(
        "gptjax.data.sources.text_dir", "PATH", ".txt, .md and .jsonl files under a directory"
    ),
    "text": Source(
        "gptjax.data.sources.text", "FILE", "one text file, cut into pieces at line ends"
    ),
    "parquet": Source(
        "gptjax.data.sources.parquet",
        "GLOB[:COLUMN]",
        "the text column (default `text`) of Parquet shards matching a glob (pyarrow)",
    ),
    "jsonl": Source(
        "gptjax.data.sources.jsonl",
        "GLOB[:FIELD]",
        "a string field (default `text`) of .jsonl, .jsonl.gz, .jsonl.zst shards matching a glob",
    ),
    "tfds": Source(
        "gptjax.data.sources.tfds", "NAME", "a TFDS dataset prepared in ArrayRecord format"
    ),
    "chat": Source(
        "gptjax.data.sources.chat",
        "PATH",
        'JSONL conversations {"messages": [{"role", "content"}]} (a file or a directory)',
        conversations=True,
    ),
    "chitchat": Source(
        "gptjax.data.sources.chitchat",
        None,
        "7,168 two-person conversations from the PyPI package chitchat-dataset (MIT)",
        conversations=True,
    ),
    "prefs": Source(
        "gptjax.data.prefs",
        "PATH",
        'JSONL preference pairs {"messages", "chosen", "rejected"} (train.objective=dpo|reward)',
        conversations=True,
        pairs=True,
    ),
}


_PLAIN = Source("", None, "")


def usage() -> str:
    return ", ".join(f"'{n}:{s.argument}'" if s.argument else f"'{n}'" for n, s in SOURCES.items())


def parse(source: str) -> tuple[Source, str]:
    """(registry entry, argument) of a `data.source` string; one-line DataError when unknown."""
    name, colon, argument = source.partition(":")
    entry = SOURCES.get(name)
    if entry is None:
        raise DataError(f"data.source={source!r}: unknown source; use {usage()}")
    if entry.argument and not argument:
        raise DataError(f"data.source={source!r} needs {name}:{entry.argument}")
    if not entry.argument and colon:
        raise DataError(f"data.source={source!r}: '{name}' takes no argument")
    return entry, argument


def conversational(cfg: DataConfig) -> bool:
    """Whether training on these data settings shows the model conversations (the chat
    template): data.source, or any source of the mixture or its phases, is a conversation
    source. An unknown source counts as not one."""
    names = [cfg.source] + [part.source for part in cfg.mixture or []]
    names += [part.source for phase in cfg.phases or [] for part in phase.mixture]
    return any(SOURCES.get(name.partition(":")[0], _PLAIN).conversations for name in names)


def check(cfg: DataConfig) -> None:
    """The data settings a source needs, before anything is read or written: the source is
    known and, for conversations, packed as segments (so they never attend to each other)."""
    entry, _ = parse(cfg.source)
    if entry.pairs and cfg.mixture is not None:
        raise DataError(f"data.source={cfg.source}: preference pairs cannot be in a data.mixture")
    for part in [p.source for p in cfg.mixture or []]:
        if SOURCES.get(part.partition(":")[0], _PLAIN).pairs:
            raise DataError(f"data.mixture: {part} holds preference pairs, not documents")
    if entry.conversations and not entry.pairs and cfg.packing != "segments":
        raise DataError(
            f"data.source={cfg.source} holds conversations: set data.packing=segments so "
            "packed conversations never attend to each other"
        )
