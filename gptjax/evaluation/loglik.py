"""Log-likelihoods of (context, continuation) token pairs, batched in jitted calls on any mesh.

A request is (context ids, continuation ids). A call scores `rows` requests at once: each row
holds the request's tokens (context + continuation, minus the last) right-padded to a length
bucket (a power of two, at least 16, at most model.seq_len), and the targets are the same tokens
moved by one. Causal attention means padding on the right changes nothing before it, so the
model runs as in training (positions 0..T-1, no mask). The rows of a call are a fixed number
per bucket (about `tokens_per_call` tokens, a multiple of the mesh's batch shards), so a task
compiles once per bucket (and row count: at most tokens_per_call // length, fewer, a power
of two, when the bucket holds fewer requests). Requests are sorted by length first, so similar
lengths share a call.

The window: a request longer than seq_len + 1 tokens keeps its last seq_len + 1 (its context is
cut from the left, as lm-eval does) and is marked `truncated`; a continuation that alone fills
the window is refused (a ScoringError).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptjax.core import steps
from gptjax.errors import UserError

MIN_BUCKET = 16


class ScoringError(UserError):
    """A request that cannot be scored (a continuation longer than the window)."""


@dataclass(frozen=True)
class Score:
    """One request's result: `logprob` the sum of log p(continuation token) in nats, `greedy`
    whether every continuation token is the model's argmax, `tokens` the continuation's length,
    `truncated` whether the context was cut to fit the window. With `per_token`: the
    continuation's token log-probs [tokens], and with `top_k` > 0 the k best (ids, log-probs)
    at each of its positions [tokens, k]."""

    logprob: float
    greedy: bool
    tokens: int
    truncated: bool
    token_logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def bucket(length: int, seq_len: int) -> int:
    """The padded row length for `length` tokens: a power of two >= 16, at most seq_len."""
    return min(seq_len, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def _score(params, inputs_BT, targets_BT, *, graphdef, top_k: int):
    """(log p(target) [B, T] f32, argmax id [B, T], top-k ids [B, T, k], top-k log-probs)."""
    gpt = nnx.merge(graphdef, params)
    logits_BTV = gpt(inputs_BT)  # f32; padded vocabulary ids are -inf
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    if not top_k:
        return target, greedy, None, None
    values, ids = jax.lax.top_k(logp_BTV, top_k)
    return target, greedy, ids.astype(jnp.int32), values


class Scorer:
    """Scores requests with one model on one mesh: `Scorer(setup, params).score(requests)`.

    `setup` is the model on its mesh (runs.load_run gives one on any devices and mesh),
    `params` its parameters. Every process of a multi-process job must make the same calls."""

    def __init__(self, setup: steps.ModelSetup, params, tokens_per_call: int = 8192):
        self.setup, self.params = setup, params
        self.seq_len = setup.cfg.model.seq_len
        self.tokens_per_call = tokens_per_call
        mesh = setup.mesh
        spec = setup.batch_sharding.spec[0]
        axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
        self.shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.compiled_buckets: set[tuple[int, int, int]] = set()  # (rows, length, top_k)
        self._jitted: dict[int, object] = {}  # top_k -> the jitted scoring function

    def rows_for(self, length: int, requests: int) -> int:
        """Rows per call for `requests` rows of bucket `length`: about tokens_per_call tokens,
        fewer when fewer requests (a power of two), a multiple of the batch shards."""
        rows = min(max(1, self.tokens_per_call // length), 1 << (requests - 1).bit_length())
        return -(-rows // self.shards) * self.shards

    def _device(self, array: np.ndarray) -> jax.Array:
        sharding = self.setup.batch_sharding
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _run(self, inputs: np.ndarray, targets: np.ndarray, top_k: int):
        self.compiled_buckets.add((*inputs.shape, top_k))
        if top_k not in self._jitted:
            self._jitted[top_k] = jax.jit(
                functools.partial(_score, graphdef=self.setup.graphdef, top_k=top_k),
                in_shardings=(
                    self.setup.param_shardings,
                    self.setup.batch_sharding,
                    self.setup.batch_sharding,
                ),
                out_shardings=self.replicated,
            )
        with self.setup.activate():
            out = self._jitted[top_k](self.params, self._device(inputs), self._device(targets))
        return jax.device_get(out)

    def score(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        per_token: bool = False,
        top_k: int = 0,
    ) -> list[Score]:
        """One Score per (context ids, continuation ids), in the order given. The context must
        hold at least one token (lm-eval gives an empty one the end-of-document token)."""
        rows = []  # (tokens, n_continuation, truncated)
        for i, (context, continuation) in enumerate(requests):
            context, continuation = list(context), list(continuation)
            if not context or not continuation:
                raise ScoringError(f"request {i}: the context and continuation need a token each")
            if len(continuation) > self.seq_len:
                raise ScoringError(
                    f"request {i}: a continuation of {len(continuation)} tokens does not fit "
                    f"the model's window of {self.seq_len}"
                )
            tokens = context + continuation
            cut = len(tokens) > self.seq_len + 1
            rows.append((tokens[-(self.seq_len + 1) :], len(continuation), cut))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        lengths = [bucket(len(tokens) - 1, self.seq_len) for tokens, _, _ in rows]
        per_bucket = {length: lengths.count(length) for length in set(lengths)}
        results: list[Score | None] = [None] * len(rows)
        start = 0
        while start < len(order):
            length = lengths[order[start]]
            n_rows = self.rows_for(length, per_bucket[length])
            group = [i for i in order[start : start + n_rows] if lengths[i] == length]
            start += len(group)
            inputs = np.zeros((n_rows, length), np.int32)
            targets = np.zeros((n_rows, length), np.int32)
            for r, i in enumerate(group):
                tokens = rows[i][0]
                inputs[r, : len(tokens) - 1] = tokens[:-1]
                targets[r, : len(tokens) - 1] = tokens[1:]
            logp, greedy, top_ids, top_logp = self._run(inputs, targets, top_k)
            for r, i in enumerate(group):
                tokens, n, cut = rows[i]
                span = slice(len(tokens) - 1 - n, len(tokens) - 1)
                results[i] = Score(
                    logprob=float(logp[r, span].astype(np.float64).sum()),
                    greedy=bool((greedy[r, span] == targets[r, span]).all()),
                    tokens=n,
                    truncated=cut,
                    token_logprobs=logp[r, span].copy() if per_token else None,
                    top_ids=top_ids[r, span].copy() if top_k else None,
                    top_logprobs=top_logp[r, span].copy() if top_k else None,
                )
        return results


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval splits a pair: spaces ending the context
    move to the continuation, the whole text is encoded once and the continuation is what
    follows the context's own encoding; an empty context is the end-of-document token."""
    if not context:
        return [tokenizer.eod_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head) :]
