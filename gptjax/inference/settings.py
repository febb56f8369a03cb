"""The facts of generation, stated once: the sampling defaults (`Settings`, `DEFAULT`), the tokens
decoded per device call, the context-length check and why a generation stopped (`Finish`).

`gptjax sample`, `gptjax chat`, `gptjax serve`, the chat model (inference/chatbot.py) and the
generator (inference/generate.py) all take their defaults and their checks from here. This module
imports no JAX: the command line reads its defaults before anything heavy loads.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from gptjax.config import ConfigError

# Tokens decoded per device call: the streaming granularity of sample, chat and serve (the first
# call makes one token, for a short time to first token).
TOKENS_PER_CALL = 16


class ContextError(ConfigError):
    """A prompt that does not fit the model's context (the message says by how much)."""


def check_context(tokens: int, context: int, where: str = "the prompt", new: int = 1) -> None:
    """ContextError unless a prompt of `tokens` tokens leaves room for `new` new tokens in a
    context of `context` (model.seq_len)."""
    if tokens + new > context:
        included = ", new tokens included" if new else ""
        raise ContextError(
            f"{where} has {tokens} tokens but the context holds {context} (model.seq_len)"
            + included
        )


@dataclass(frozen=True)
class Sampling:
    """How to choose each token: temperature 0 is greedy (argmax); otherwise sample from the
    softmax of logits / temperature restricted to the top-k tokens (0: all) and to the smallest
    set whose probability reaches top_p (1: all)."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(
                f"temperature {self.temperature}: use 0 (greedy) or a positive number"
            )
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise ConfigError(f"top_k {self.top_k}: use a whole number >= 0 (0: no top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p {self.top_p}: use a number in (0, 1] (1: no top-p)")


@dataclass(frozen=True)
class Settings:
    """How to generate one text: at most `max_new_tokens`, sampled as `Sampling` says, seeded,
    cut at the first of the `stop` strings."""

    max_new_tokens: int = 200
    temperature: float = Sampling.temperature
    top_k: int = Sampling.top_k
    top_p: float = Sampling.top_p
    seed: int = 0
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)

    def check(self, least_new: int = 1) -> None:
        """A ConfigError with one line for a bad setting (at least `least_new` new tokens)."""
        self.sampling  # noqa: B018 - validates the sampling settings
        if self.max_new_tokens < least_new:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens}: use {least_new} or more")
        if any(not s for s in self.stop):
            raise ConfigError("stop holds an empty string")


DEFAULT = Settings()


class Finish(enum.StrEnum):
    """Why a row stopped. The decode loop reports the first three as integer codes
    (`Finish.of_code`; 0: still running); a stop string is found on the host."""

    EOD = "eod"  # the end-of-document token or another stop id (a chat's end of turn)
    LENGTH = "length"  # max_new_tokens
    CONTEXT = "context"  # prompt + new tokens fill model.seq_len
    STOP = "stop"  # a stop string

    @property
    def code(self) -> int:
        """The decode loop's integer for this reason (a stop string has none)."""
        return _CODES[self]

    @classmethod
    def of_code(cls, code: int) -> Finish | None:
        """The reason for a decode loop code; None while the row runs (0)."""
        return _REASONS.get(int(code))

    @property
    def reply(self) -> str:
        """The reason as OpenAI's API and the chat model name it: "stop" (the model ended its
        text, or a stop string) or "length" (max_new_tokens, or the context is full)."""
        return "length" if self in (Finish.LENGTH, Finish.CONTEXT) else "stop"


_CODES = {Finish.EOD: 1, Finish.LENGTH: 2, Finish.CONTEXT: 3}
_REASONS = {code: reason for reason, code in _CODES.items()}
