"""A trained run as a chat model: its chat template, history fitted to the context, replies
streamed from the KV-cache generator. `gptjax chat` (inference/terminal.py) and `gptjax serve`
(inference/serve.py) both talk to the model through this.

A reply is generated after the conversation rendered with the template and `<|assistant|>`
(gptjax/data/chat.py) and ends at `<|end|>` (or the end-of-document token), at a stop string,
after `max_new_tokens`, or when the context is full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptjax.data import chat
from gptjax.inference import generate
from gptjax.inference.settings import TOKENS_PER_CALL, ContextError, Settings, check_context
from gptjax.training import runs

__all__ = ["Chatbot", "ContextError", "Message", "Piece", "Settings"]

Message = chat.Message


@dataclass(frozen=True)
class Piece:
    """New text of a reply; `finish` on the last piece, as `Finish.reply` names it: "stop" (end
    of turn, end of document or a stop string) or "length" (max_new_tokens, or the context is
    full)."""

    text: str
    tokens: int  # new tokens this piece stands for
    finish: str | None = None


class Chatbot:
    """One run, loaded once on this process's devices (`devices` and `mesh` as in
    runs.load_run: default one device; `quant` "int8": int8 weights)."""

    def __init__(
        self,
        run_dir: str | Path,
        step: int | None = None,
        chunk: int = TOKENS_PER_CALL,
        devices=None,
        mesh=None,
        quant: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.setup, self.params, self.tokenizer = runs.load_run(run_dir, step, devices, mesh, quant)
        self.template = chat.Template(self.tokenizer)
        self.context = self.setup.cfg.model.seq_len
        self.chunk = chunk
        self.name = self.run_dir.resolve().name

    def reply_room(self, max_new_tokens: int) -> int:
        """Tokens of the context kept free for a reply when history is dropped."""
        return max(1, min(max_new_tokens, self.context // 4))

    def fit(self, messages: list[Message], max_new_tokens: int) -> list[Message]:
        """The newest messages whose prompt leaves room for a reply: the oldest turns are
        dropped (the system message is kept, and the kept part starts at a user message).
        ContextError when even the last message does not fit."""
        limit = self.context - self.reply_room(max_new_tokens)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(system) :]
        while rest:
            if len(self.template.prompt(system + rest)) <= limit:
                return system + rest
            rest = rest[1:]
            while rest and rest[0]["role"] == "assistant":
                rest = rest[1:]
        size = len(self.template.prompt(system + messages[-1:]))
        raise ContextError(
            f"the message takes {size} tokens with the template, but the context holds "
            f"{self.context} (model.seq_len) with {self.context - limit} kept for the reply"
        )

    def prompt_ids(self, messages: list[Message] | None = None, prompt: str = "") -> list[int]:
        """The token ids generation starts from: the messages rendered with the template and
        `<|assistant|>`, or a plain prompt (empty: a new document)."""
        if messages is not None:
            return self.template.prompt(messages)
        return generate.encode_prompts(self.tokenizer, [prompt])[0]

    def reply(
        self, messages: list[Message], settings: Settings, ids: list[int] | None = None
    ) -> Iterator[Piece]:
        """Stream the assistant's next turn after `messages` (which must fit the context);
        `ids`: the messages already rendered (`prompt_ids`)."""
        ids = self.prompt_ids(messages) if ids is None else ids
        return self._stream(ids, settings, *self.stopping(settings, reply=True))

    def stopping(self, settings: Settings, reply: bool) -> tuple[list[str], list[int]]:
        """(stop strings, stop ids besides the end-of-document token) of a reply (else a
        plain continuation)."""
        stop, stop_ids = [*settings.stop], []
        if not reply:
            return stop, stop_ids
        if self.template.end_id is None:
            stop += [chat.END, *chat.MARKERS.values()]  # stop at the markers' text
        else:
            stop_ids.append(self.template.end_id)
        return stop, stop_ids

    def complete(
        self, prompt: str, settings: Settings, ids: list[int] | None = None
    ) -> Iterator[Piece]:
        """Stream a plain continuation of `prompt` (ends at the end-of-document token); `ids`:
        the prompt already encoded (`prompt_ids`)."""
        ids = self.prompt_ids(prompt=prompt) if ids is None else ids
        return self._stream(ids, settings, *self.stopping(settings, reply=False))

    def prompt_tokens(self, messages: list[Message] | None = None, prompt: str = "") -> int:
        return len(self.prompt_ids(messages, prompt))

    def _stream(self, ids, settings: Settings, stop: list[str], stop_ids: list[int]):
        check_context(len(ids), self.context)  # at once, not at the first piece
        chosen = {**dataclasses.asdict(settings), "stop": stop or None}
        pieces = generate.generate(
            self.setup,
            self.params,
            self.tokenizer,
            [ids],
            **chosen,
            chunk=self.chunk,
            stop_ids=stop_ids,
        )
        return (Piece(p.text, len(p.ids), p.finish.reply if p.finish else None) for p in pieces)
