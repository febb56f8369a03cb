"""A trained run as a chat model: its chat template, history fitted to the context, replies
streamed from the KV-cache generator. `gptjax chat` (inference/terminal.py) and `gptjax serve`
(inference/serve.py) both talk to the model through this.

A reply is generated after the conversation rendered with the template and `<|assistant|>`
(gptjax/data/chat.py) and ends at `<|end|>` (or the end-of-document token), at a stop string,
after `max_new_tokens`, or when the context is full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gptjax.config import ConfigError
from gptjax.data import chat
from gptjax.errors import UserError
from gptjax.inference import generate
from gptjax.training import runs

Message = chat.Message


class ContextError(UserError):
    """A prompt that does not fit the model's context (the message says by how much)."""


@dataclass(frozen=True)
class Settings:
    """How to generate one reply (see gptjax/inference/generate.py for the sampling settings)."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """A ConfigError with one line for a bad setting."""
        generate.Sampling(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens}: use 1 or more")
        if any(not s for s in self.stop):
            raise ConfigError("stop holds an empty string")


@dataclass(frozen=True)
class Piece:
    """New text of a reply; `finish` on the last piece: "stop" (end of turn, end of document or
    a stop string), "length" (max_new_tokens) or "context" (the context is full)."""

    text: str
    tokens: int  # new tokens this piece stands for
    finish: str | None = None


class Chatbot:
    """One run, loaded once on this process's devices."""

    def __init__(self, run_dir: str | Path, step: int | None = None, chunk: int = 8):
        self.run_dir = Path(run_dir)
        self.setup, self.params, self.tokenizer = runs.load_run(run_dir, step)
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

    def check_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) >= self.context:
            raise ContextError(
                f"the prompt has {len(ids)} tokens but the context holds {self.context} "
                "(model.seq_len), new tokens included"
            )

    def reply(self, messages: list[Message], settings: Settings) -> Iterator[Piece]:
        """Stream the assistant's next turn after `messages` (which must fit the context)."""
        ids = self.template.prompt(messages)
        self.check_prompt(ids)
        stop = [*settings.stop]
        stop_ids = []
        if self.template.end_id is None:
            stop += [chat.END, *chat.MARKERS.values()]  # markers as text: stop at their text
        else:
            stop_ids.append(self.template.end_id)
        return self._stream(ids, settings, stop, stop_ids)

    def complete(self, prompt: str, settings: Settings) -> Iterator[Piece]:
        """Stream a plain continuation of `prompt` (ends at the end-of-document token)."""
        ids = generate.encode_prompts(self.tokenizer, [prompt])[0]
        self.check_prompt(ids)
        return self._stream(ids, settings, [*settings.stop], [])

    def prompt_tokens(self, messages: list[Message] | None = None, prompt: str = "") -> int:
        if messages is not None:
            return len(self.template.prompt(messages))
        return len(generate.encode_prompts(self.tokenizer, [prompt])[0])

    def _stream(self, ids, settings: Settings, stop: list[str], stop_ids: list[int]):
        pieces = generate.generate(
            self.setup,
            self.params,
            self.tokenizer,
            [ids],
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=stop or None,
            chunk=self.chunk,
            stop_ids=stop_ids,
        )
        finish_names = {"eod": "stop", "stop": "stop", "length": "length", "context": "context"}
        for piece in pieces:
            finish = finish_names[piece.finish] if piece.finish else None
            yield Piece(piece.text, len(piece.ids), finish)
