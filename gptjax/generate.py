"""Load a trained run and sample text from it (temperature, top-k, top-p)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import steps
from gptjax.data import tokenizer as tok


def filter_logits(logits_V, temperature: float, top_k: int, top_p: float, vocab: int):
    """Scaled logits with everything outside the top-k / top-p (nucleus) set at -inf."""
    logits = jnp.where(jnp.arange(logits_V.shape[-1]) < vocab, logits_V, -jnp.inf)
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = jnp.sort(logits)[-min(top_k, vocab)]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        keep_sorted = jnp.cumsum(probs) - probs < top_p  # the smallest set reaching top_p
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "temperature", "top_k", "top_p"))
def _next_token(params, window_T, position, key, *, graphdef, vocab, temperature, top_k, top_p):
    """The next token after `window_T[position]`; compiled once per model and settings."""
    logits = nnx.merge(graphdef, params)(window_T[None])[0, position]
    if temperature <= 0:  # greedy
        return jnp.argmax(jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf))
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p, vocab))


def sample(
    setup: steps.Setup,
    params: Any,
    tokenizer: tok.TextTokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eod: bool = True,
) -> str:
    """Continue `prompt`; the context is the last seq_len tokens (fixed shape: one compile)."""
    T = setup.cfg.model.seq_len
    settings = dict(
        graphdef=setup.graphdef,
        vocab=tokenizer.vocab_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
    key = jax.random.key(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = (ids + new)[-T:]
        window = np.zeros(T, np.int32)
        window[: len(context)] = context
        key, sub = jax.random.split(key)
        token = int(_next_token(params, window, len(context) - 1, sub, **settings))
        if stop_at_eod and token == tokenizer.eod_id:
            break
        new.append(token)
    return prompt + tokenizer.decode(new)
