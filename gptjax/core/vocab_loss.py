"""Cross-entropy over the vocabulary, plain or chunked along the sequence.

The plain form materialises f32 logits [B, T, V] (and, in the backward, their gradient of the
same size): for GPT-2 small at B=16, T=1024, V=50,304 that is 3.3 GB per copy. The chunked form
scans over sequence chunks of `chunk` positions, computing logits [B, chunk, V] for one chunk at a
time inside `jax.checkpoint`, so the backward recomputes each chunk's logits instead of storing
them: peak logits memory falls by T / chunk for one extra head matmul (4 instead of 3).
Shapes: B batch, T sequence, D d_model, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.core.sharding import constrain


def logits(
    h_BTD: jax.Array, w_VD: jax.Array, vocab: int | None = None, softcap: float = 0.0
) -> jax.Array:
    """Logits [B, T, V] in f32 from hidden states [B, T, D] and the head [V, D] (compute dtype).

    `softcap` > 0: soft-capped logits, softcap * tanh(logits / softcap) (Gemma 2; the
    modded-nanogpt speedrun), smooth and within (-softcap, softcap). Ids at or above `vocab` (a
    table padded past the tokenizer's size) get -inf: they are never sampled and take no
    probability in the loss."""
    out = jnp.einsum(
        "btd,vd->btv", h_BTD, w_VD.astype(h_BTD.dtype), preferred_element_type=jnp.float32
    )
    if softcap > 0:
        out = softcap * jnp.tanh(out / softcap)
    if vocab is not None and vocab < w_VD.shape[0]:
        out = jnp.where(jnp.arange(w_VD.shape[0]) < vocab, out, -jnp.inf)
    return constrain(out, ("batch", "seq", "vocab"))


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, T] in nats (f32): logsumexp(logits) - logits[target].

    (A one-hot mask and sum instead of the gather measured 1.35x slower on XLA:CPU for the
    cpu_small head, forward + backward; see docs/performance.md.)
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit


def token_losses(
    h_BTD: jax.Array,
    w_VD: jax.Array,
    targets_BT: jax.Array,
    chunk: int = 0,
    vocab=None,
    softcap: float = 0.0,
):
    """Per-token cross-entropy [B, T] (nats, f32) of the head `w_VD` applied to `h_BTD`.

    `vocab`: ids at or above it are padding; `softcap`: capped logits (see `logits`). `chunk` =
    0 computes all logits at once; otherwise `chunk` (which must divide T) sequence positions at
    a time, recomputing each chunk's logits in the backward pass.
    """
    B, T, D = h_BTD.shape
    if chunk <= 0 or chunk >= T:
        return cross_entropy(logits(h_BTD, w_VD, vocab, softcap), targets_BT)
    if T % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {T}")
    n = T // chunk
    h_NBCD = h_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_BCD, targets_BC):
        return cross_entropy(logits(h_BCD, w_VD, vocab, softcap), targets_BC)

    _, losses_NBC = jax.lax.scan(lambda _, xs: (None, one_chunk(*xs)), None, (h_NBCD, targets_NBC))
    return losses_NBC.swapaxes(0, 1).reshape(B, T)
