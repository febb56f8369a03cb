"""`chitchat`: the Chit-Chat Challenge corpus of BYU's PCC lab (MIT licence; 7,168 English
conversations between two people, 258K utterances, 12.5M characters), shipped as one JSON file
inside the PyPI package `chitchat-dataset` (`pip install chitchat-dataset`, or gptjax[chat]).

The two speakers alternate; the one who opens is the user and the other the assistant. A
speaker's consecutive utterances form one message, joined by spaces.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gptjax.data.chat as chat
import gptjax.data.corpus as corpus
from gptjax.data.corpus import DataError


def dataset_file() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source=chitchat needs the PyPI package chitchat-dataset: "
            "pip install chitchat-dataset (or pip install 'gptjax[chat]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall chitchat-dataset")
    return path


def conversations(path: Path):
    """(conversation id, messages) in the file's order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not the chitchat JSON ({error})") from None
    roles = ("user", "assistant")
    for name, record in data.items():
        messages = [
            {"role": roles[i % 2], "content": " ".join(u["text"] for u in turn)}
            for i, turn in enumerate(record["messages"])
        ]
        yield name, messages


def documents(argument: str):
    del argument
    path = dataset_file()  # fail now when the package is missing
    return lambda: ((name, chat.to_json(m)) for name, m in conversations(path))


def fingerprint(argument: str) -> str:
    del argument
    path = dataset_file()
    return corpus.fingerprint_files(path.parent, [path])
