"""Conversations as tokens: the chat template and its loss mask.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(a system message only first). It is rendered as

    <|system|>TEXT<|end|>  <|user|>TEXT<|end|>  <|assistant|>TEXT<|end|>  <|user|>...

with nothing between the pieces, and the loss mask (per token, as a target) is 1 exactly on the
assistant's text and the `<|end|>` that closes it: the model learns to answer and to stop, never
to imitate the user. A prompt for a reply is the conversation followed by `<|assistant|>`;
generation stops at `<|end|>`.

The markers are control pieces every tokenizer gptjax trains reserves (gptjax/data/tokenizer.py):
one id each, never produced from text, so nothing a user types can forge a turn. A tokenizer
without them (a run trained before they existed, another vocabulary) gets the same markers as
plain text: each marker and each message is encoded on its own and the ids concatenated, so the
mask still covers exactly the assistant's tokens; generation then stops when the decoded reply
contains the text `<|end|>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gptjax.data.corpus import DataError
from gptjax.data.tokenizer import ROLE_PIECES

ROLES = ("system", "user", "assistant")
MARKERS = dict(zip(ROLES, ROLE_PIECES[:3], strict=True))
END = ROLE_PIECES[3]
VERSION = 1  # part of the packed-data cache key: bump when the rendering changes

Message = dict[str, str]


def check(messages: Any, where: str) -> list[Message]:
    """`messages` as a clean list of {"role", "content"}; a DataError naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {index} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {index} has no string 'content'")
        if role == "system" and index > 0:
            raise DataError(f"{where}: message {index}: a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def parse_record(line: str, where: str) -> tuple[dict, list[Message]]:
    """One JSONL line holding a conversation: (the record, its checked "messages"); a DataError
    naming `where` (PATH:LINE) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{where}: not valid JSON") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: no 'messages' list")
    return record, check(record["messages"], where)


def to_json(messages: list[Message]) -> str:
    """How a conversation is stored as a document's text."""
    return json.dumps({"messages": messages}, ensure_ascii=False)


def from_json(text: str) -> list[Message]:
    return json.loads(text)["messages"]


def plain_text(text: str) -> str:
    """The messages' words of a stored conversation, one per line (what a tokenizer trains on)."""
    return "\n".join(m["content"] for m in from_json(text))


class Template:
    """Renders conversations with one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        piece_id = getattr(tokenizer, "piece_id", lambda piece: None)
        ids = {piece: piece_id(piece) for piece in ROLE_PIECES}
        self.dedicated = all(i is not None for i in ids.values())
        if self.dedicated:
            pieces = {piece: [i] for piece, i in ids.items()}
        else:
            pieces = {piece: list(tokenizer.encode(piece)) for piece in ROLE_PIECES}
        self.marker = {role: pieces[MARKERS[role]] for role in ROLES}
        self.end = pieces[END]
        self.end_id = ids[END] if self.dedicated else None  # stop token (else stop on END text)

    def render_many(
        self, conversations: Sequence[list[Message]]
    ) -> list[tuple[list[int], list[int]]]:
        """(token ids, loss mask) of each conversation; the texts are encoded in one batch."""
        contents = [m["content"] for messages in conversations for m in messages]
        encoded = iter(self.tokenizer.encode_batch(contents) if contents else [])
        out = []
        for messages in conversations:
            ids: list[int] = []
            mask: list[int] = []
            for message in messages:
                scored = int(message["role"] == "assistant")
                text = list(next(encoded))
                marker = self.marker[message["role"]]
                ids += marker + text + self.end
                mask += [0] * len(marker) + [scored] * (len(text) + len(self.end))
            out.append((ids, mask))
        return out

    def render(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        return self.render_many([messages])[0]

    def prompt(self, messages: list[Message]) -> list[int]:
        """The ids that ask for the next assistant turn."""
        return self.render(messages)[0] + self.marker["assistant"]
