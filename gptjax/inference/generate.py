"""Generation: prompts prefilled into a static KV cache, then decoded in a jitted loop.

One call (`Generator.stream`, or `generate` with a tokenizer) runs like this:

1. The prompts (token ids) are left-padded to a length bucket — a power of two, at least 16, at
   most `model.seq_len` — with segment id 0 (nothing attends to padding) and positions counted
   from each row's first real token; the row count is padded to a power of two that the mesh's
   batch axes divide. One jitted call creates the cache (`model.seq_len` slots per row) and
   prefills it.
2. A jitted `lax.while_loop` decodes up to `chunk` tokens per call: it samples a token for every
   running row, stops rows one by one (end-of-document token, `max_new_tokens`, the end of the
   context) and appends the tokens of the rows still running to the cache (`GPT.extend`). The
   cache is donated. Sampling settings, the seed, `max_new_tokens` and the step count are traced
   arrays, so changing them never recompiles: there is one prefill and one decode program per
   (rows, prompt bucket).
3. Between calls the host turns each row's new tokens into text (complete characters only),
   looks for the stop string and yields the pieces, while the device already decodes the next
   chunk.

The context end: a row stops when prompt + new tokens fill `model.seq_len` (finish reason
"context"); its tokens are then exactly those of a full recompute over the whole text. When the
shared cache runs out of slots before that (left padding takes slots too), it is shifted left by
the padding no running row needs, so every row gets its full context whatever it is batched with.

Sampling of row r at its n-th new token uses the key fold_in(fold_in(key(seed), r), n): a sample
depends on (seed, row, prompt, settings), not on the chunk size or the other rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptjax.config import ConfigError
from gptjax.core import model, sharding, steps
from gptjax.data import tokenizer as tok
from gptjax.inference.settings import DEFAULT, TOKENS_PER_CALL, Finish, Sampling, check_context

MAX_STOP_IDS = 4  # token ids that end a row (end of document, end of turn, ...): a fixed width

MIN_BUCKET = 16


# --- sampling -----------------------------------------------------------------------------------


def _scaled(logits, temperature, vocab: int):
    """Logits / temperature, ids >= `vocab` at -inf (temperature a number or [...] array)."""
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits.shape[:-1])[..., None]
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    return logits / jnp.maximum(t, 1e-6)


def filter_logits(logits, temperature, top_k, top_p, vocab: int):
    """Logits / temperature with everything outside the top-k / top-p (nucleus) set at -inf.

    `logits` [..., V]; the settings are numbers or arrays of shape [...] (traced is fine);
    top_k 0 and top_p 1 keep everything; ids >= `vocab` are never kept. Ties at the edge of
    either set are kept."""
    lead = logits.shape[:-1]
    setting = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), lead)[..., None]
    top_k, top_p = setting(top_k, jnp.int32), setting(top_p, jnp.float32)
    logits = _scaled(logits, temperature, vocab)
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(top_k, 1, vocab) - 1, axis=-1)
    cut_k = top_k > 0
    logits = jnp.where(cut_k & (logits < kth), -jnp.inf, logits)
    descending = jnp.where(cut_k & (descending < kth), -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    reached = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest set reaching top_p
    smallest = jnp.min(jnp.where(reached, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < smallest), -jnp.inf, logits)


def _choose(logits_BV, keys_B, settings, vocab: int):
    """One token per row: argmax where temperature is 0, else a draw from the filtered logits.
    The sort and the draw run only when some row needs them."""

    def greedy(_):
        valid = jnp.arange(logits_BV.shape[-1]) < vocab
        return jnp.argmax(jnp.where(valid, logits_BV, -jnp.inf), axis=-1).astype(jnp.int32)

    def draw(_):
        t, k, p = settings["temperature"], settings["top_k"], settings["top_p"]
        filtering = jnp.any(((k > 0) | (p < 1.0)) & (t > 0))
        filtered = jax.lax.cond(
            filtering,
            lambda: filter_logits(logits_BV, t, k, p, vocab),
            lambda: _scaled(logits_BV, t, vocab),
        )
        drawn = jax.vmap(jax.random.categorical)(keys_B, filtered).astype(jnp.int32)
        return jnp.where(t > 0, drawn, greedy(None))

    return jax.lax.cond(jnp.all(settings["temperature"] <= 0), greedy, draw, None)


# --- the two jitted programs --------------------------------------------------------------------


def _constrain_cache(cache):
    return model.constrain_cache(cache)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(params, tokens_BP, lengths_B, max_new_B, *, graphdef):
    """Create the cache, prefill the left-padded prompts; returns (cache, decoding state)."""
    gpt = nnx.merge(graphdef, params)
    B, P = tokens_BP.shape
    start = P - lengths_B[:, None]
    column = jnp.arange(P)[None]
    segments = (column >= start).astype(jnp.int32)
    positions = jnp.maximum(column - start, 0)
    # prefill into P slots (attention over the prompt only), then grow the cache to seq_len
    cache = _constrain_cache(model.init_cache(gpt.cfg, B, P))
    logits, cache = gpt.extend(tokens_BP, positions, cache, segments, last_only=True)
    cache = model.grow_cache(gpt.cfg, cache, gpt.cfg.seq_len)
    state = {
        "logits": logits[:, -1],  # next-token logits [B, V]
        "length": lengths_B,  # tokens of each row so far, prompt included
        "new": jnp.zeros_like(lengths_B),  # tokens generated
        # 0: running, else a Finish code
        "reason": jnp.where(max_new_B > 0, 0, Finish.LENGTH.code).astype(jnp.int32),
    }
    return _constrain_cache(cache), state


def next_token(state, row_keys, settings, vocab: int, seq_len: int):
    """One decoding step's choice for every row (this module's and the serving engine's decode
    loops): (token [B], shown [B]: a running row's token that is not an end-of-document id, the
    rows' new length, new-token count and finish reason). A row's key is `row_keys[b]` folded
    with its count of new tokens, so its draws do not depend on the other rows."""
    active = state["reason"] == 0
    keys = jax.vmap(jax.random.fold_in)(row_keys, state["new"])
    token = _choose(state["logits"], keys, settings, vocab)
    new = state["new"] + active
    length = state["length"] + active
    # the end-of-document token and others (settings["eod"] [S] or per row [B, S], -1 pads)
    ends = jnp.any(token[:, None] == settings["eod"], axis=1)
    reason = jnp.select(
        [ends, new >= settings["max_new"], length >= seq_len],
        [Finish.EOD.code, Finish.LENGTH.code, Finish.CONTEXT.code],
        0,
    )
    reason = jnp.where(active, reason, state["reason"])
    return token, active & ~ends, {"length": length, "new": new, "reason": reason}


def _shift_out_padding(cache, length_B, running_B):
    """The cache is full: shift every row left by the slots no running row needs (the padding
    before the longest running row). A running row holds length - 1 tokens in the cache."""
    S = cache["segment_ids"].shape[1]
    first = cache["index"] - (length_B - 1)  # each row's first slot
    shift = jnp.min(jnp.where(running_B, first, S))
    shift = jnp.where(jnp.any(running_B), shift, 0)
    return _constrain_cache(model.shift_cache(cache, shift))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "chunk", "vocab"), donate_argnames=("cache",)
)
def _decode(params, cache, state, settings, halt_B, count, *, graphdef, chunk: int, vocab: int):
    """Up to min(chunk, count) tokens per row, stopping early when every row has finished.

    Returns (tokens [B, chunk], emitted [B, chunk] (False: padding, a finished row, or the
    end-of-document token), reasons [B], cache, state). `halt_B` finishes rows (the host's stop
    strings)."""
    gpt = nnx.merge(graphdef, params)
    seq_len = gpt.cfg.seq_len
    B = halt_B.shape[0]
    base = jax.random.key(settings["seed"])
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(settings["row"])
    halted = jnp.where(halt_B & (state["reason"] == 0), Finish.EOD.code, state["reason"])
    state = dict(state, reason=halted)

    def running(carry):
        i, state, *_ = carry
        return (i < jnp.minimum(count, chunk)) & jnp.any(state["reason"] == 0)

    def step(carry):
        i, state, cache, tokens, emitted = carry
        token, shown, rows = next_token(state, row_keys, settings, vocab, seq_len)
        length, reason = rows["length"], rows["reason"]
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        emitted = jax.lax.dynamic_update_slice(emitted, shown[:, None], (0, i))
        # append the tokens of the rows still running (the others write padding)
        keep = reason == 0
        cache = jax.lax.cond(
            cache["index"] >= cache["segment_ids"].shape[1],
            lambda c: _shift_out_padding(c, length, keep),
            lambda c: c,
            cache,
        )
        position = jnp.clip(length - 1, 0, seq_len - 1)[:, None]
        logits, cache = gpt.extend(token[:, None], position, cache, keep[:, None].astype(jnp.int32))
        return i + 1, dict(rows, logits=logits[:, 0]), _constrain_cache(cache), tokens, emitted

    tokens = jnp.zeros((B, chunk), jnp.int32)
    emitted = jnp.zeros((B, chunk), bool)
    _, state, cache, tokens, emitted = jax.lax.while_loop(
        running, step, (jnp.zeros((), jnp.int32), state, cache, tokens, emitted)
    )
    return tokens, emitted, state["reason"], cache, state


# --- driving a batch ----------------------------------------------------------------------------


class Chunk(NamedTuple):
    """New output of one row: token ids, their text (complete characters; cut before the stop
    string) and, on the row's last chunk, why it stopped (a `Finish`: "eod", "stop", "length" or
    "context")."""

    row: int
    ids: list[int]
    text: str
    finish: Finish | None


def bucket(n: int, limit: int) -> int:
    """The padded length for n: a power of two, at least MIN_BUCKET, at most `limit`."""
    return min(limit, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


class Generator:
    """Generation for one model on its setup's mesh (rows over the batch axes, the cache's heads
    over `tensor`). Cheap to create: the compiled programs are shared by every Generator of the
    same model, one prefill and one decode per (rows, prompt bucket).

    `chunk`: tokens decoded per device call (the streaming granularity; the first call makes
    one token, for a short time to first token)."""

    def __init__(self, setup: steps.ModelSetup, params: Any, chunk: int = TOKENS_PER_CALL):
        if chunk < 1:
            raise ConfigError(f"chunk {chunk}: use a positive number of tokens per call")
        self.setup, self.params, self.chunk = setup, params, chunk
        self.cfg = setup.cfg.model
        batch_spec = sharding.logical_to_spec(("batch",), setup.rules)
        axes = batch_spec[0] or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        self.row_multiple = math.prod(setup.mesh.shape[axis] for axis in axes)
        self._rows = NamedSharding(setup.mesh, batch_spec)
        self._rows2 = NamedSharding(setup.mesh, PartitionSpec(batch_spec[0], None))
        self._scalar = NamedSharding(setup.mesh, PartitionSpec())

    def plan_rows(self, rows: int | None = None) -> int:
        """The row count a batch of `rows` prompts decodes with (None: the fewest possible)."""
        rows = max(1 << (max(rows or 1, 1) - 1).bit_length(), self.row_multiple)
        return -(-rows // self.row_multiple) * self.row_multiple

    def lowered(self, rows: int | None = None) -> dict[str, Any]:
        """The prefill (the longest prompt bucket) and decode programs for `rows` rows, as
        callables that lower them on abstract inputs (`self.params` may be shapes with
        shardings): what `gptjax plan --generate` compiles for a target."""
        rows = self.plan_rows(rows)
        P = bucket(self.cfg.seq_len - 1, self.cfg.seq_len)
        shape = lambda s, dtype, where: jax.ShapeDtypeStruct(s, dtype, sharding=where)
        row = lambda dtype: shape((rows,), dtype, self._rows)
        scalar = lambda s, dtype: shape(s, dtype, self._scalar)
        graphdef = self.setup.graphdef
        prefill_args = (self.params, shape((rows, P), jnp.int32, self._rows2), row(jnp.int32))
        settings = {
            "temperature": row(jnp.float32),
            "top_k": row(jnp.int32),
            "top_p": row(jnp.float32),
            "max_new": row(jnp.int32),
            "row": row(jnp.int32),
            "seed": scalar((), jnp.int32),
            "eod": scalar((MAX_STOP_IDS,), jnp.int32),
        }

        def prefill():
            with self.setup.activate():
                return _prefill.lower(*prefill_args, settings["max_new"], graphdef=graphdef)

        def decode():
            out = prefill().compile()
            cache, state = jax.tree.map(
                lambda info, where: shape(info.shape, info.dtype, where),
                out.out_info,
                out.output_shardings,
            )
            with self.setup.activate():
                return _decode.lower(
                    self.params, cache, state, settings, row(jnp.bool_), scalar((), jnp.int32),
                    graphdef=graphdef, chunk=self.chunk, vocab=self.cfg.vocab,
                )  # fmt: skip

        return {"prefill": prefill, "decode": decode}

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = DEFAULT.max_new_tokens,
        sampling: Sampling = DEFAULT.sampling,
        seed: int = 0,
        eod_id: int | Sequence[int] | None = None,
        vocab: int | None = None,
        halt: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decode a batch of token-id prompts (each non-empty, shorter than the context).

        Yields (tokens [R, k], emitted [R, k] bool, reasons [R] int) per device call for the R
        prompts until every row has finished: row r's new tokens are tokens[r][emitted[r]],
        its reason is 0 while it runs, then a `Finish` code (`Finish.of_code`). Setting halt[r]
        (a bool [R] array the caller owns) finishes row r from the next call on. `eod_id` (one id
        or several, e.g. a chat's end-of-turn marker too) ends a row, None never stops at a token;
        `vocab` (default the model's) bounds the ids that can be drawn.
        """
        n = len(prompts)
        max_new_tokens = self._check(prompts, max_new_tokens)
        rows = self.plan_rows(n)
        tokens, lengths, max_new = _left_padded(prompts, max_new_tokens, rows, self.cfg.seq_len)
        settings = self._device_settings(sampling, max_new, seed, eod_id)
        vocab = min(vocab or self.cfg.vocab, self.cfg.vocab)
        put = jax.device_put
        graphdef = self.setup.graphdef
        halt = np.zeros(n, bool) if halt is None else halt

        def decode(cache, state, count):
            stopped = np.zeros(rows, bool)
            stopped[:n] = halt
            with self.setup.activate():
                return _decode(
                    self.params, cache, state, settings, put(stopped, self._rows),
                    put(np.int32(count), self._scalar),
                    graphdef=graphdef, chunk=self.chunk, vocab=vocab,
                )  # fmt: skip

        with self.setup.activate():
            cache, state = _prefill(
                self.params,
                put(tokens, self._rows2),
                put(lengths, self._rows),
                settings["max_new"],
                graphdef=graphdef,
            )
        pending = decode(cache, state, 1)  # one token first: a short time to first token
        while True:
            out_tokens, out_emitted, reasons, cache, state = pending
            reasons = np.asarray(reasons)[:n]
            if not (reasons > 0).all():  # the device decodes the next chunk while the host reads
                pending = decode(cache, state, self.chunk)
            yield np.asarray(out_tokens)[:n], np.asarray(out_emitted)[:n], reasons
            if (reasons > 0).all() or halt.all():
                return

    def _check(self, prompts, max_new_tokens: int | Sequence[int]) -> list[int]:
        """Each prompt's max_new_tokens; ConfigError for no prompts, a negative count, an empty
        prompt or one that does not fit the context."""
        n = len(prompts)
        if n == 0:
            raise ConfigError("no prompts to continue")
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * n
        if min(max_new_tokens) < 0:
            raise ConfigError(f"max_new_tokens {min(max_new_tokens)}: use 0 or more")
        for i, ids in enumerate(prompts):
            if not len(ids):
                raise ConfigError(f"prompt {i} is empty (give at least one token)")
            check_context(len(ids), self.cfg.seq_len, f"prompt {i}" if n > 1 else "the prompt")
        return list(max_new_tokens)

    def _device_settings(self, sampling: Sampling, max_new: np.ndarray, seed: int, eod_id):
        """The decode loop's traced settings, on the mesh: per row (sampling, max_new, the row's
        index) and shared (the seed, the stop ids padded to MAX_STOP_IDS)."""
        rows = len(max_new)
        per_row = {
            "temperature": np.full(rows, sampling.temperature, np.float32),
            "top_k": np.full(rows, sampling.top_k, np.int32),
            "top_p": np.full(rows, sampling.top_p, np.float32),
            "max_new": max_new,
            "row": np.arange(rows, dtype=np.int32),
        }
        settings = {k: jax.device_put(v, self._rows) for k, v in per_row.items()}
        settings["seed"] = jax.device_put(np.int32(seed), self._scalar)
        stop_ids = [] if eod_id is None else [eod_id] if isinstance(eod_id, int) else eod_id
        if len(stop_ids) > MAX_STOP_IDS:
            raise ConfigError(f"{len(stop_ids)} stop ids: at most {MAX_STOP_IDS}")
        # a fixed width (-1 pads: never a token), so any number of stop ids is one program
        eod = np.full(MAX_STOP_IDS, -1, np.int32)
        eod[: len(stop_ids)] = stop_ids
        settings["eod"] = jax.device_put(eod, self._scalar)
        return settings


def _left_padded(prompts, max_new_tokens: list[int], rows: int, seq_len: int):
    """(tokens [rows, P], lengths [rows], max_new [rows]): the prompts left-padded to their
    length bucket P; padding rows have max_new 0 (finished before they start)."""
    P = bucket(max(len(ids) for ids in prompts), seq_len)
    tokens = np.zeros((rows, P), np.int32)
    lengths = np.ones(rows, np.int32)
    max_new = np.zeros(rows, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, P - len(ids) :] = ids
        lengths[i] = len(ids)
        max_new[i] = max_new_tokens[i]
    return tokens, lengths, max_new


# --- text -------------------------------------------------------------------------------------


class _TextRow:
    """One row's ids -> text pieces: complete characters only, held back while they might begin
    a stop string, cut before the first one."""

    def __init__(self, tokenizer, stop: str | Sequence[str] | None):
        self.tokenizer = tokenizer
        self.stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.ids: list[int] = []
        self.shown = 0  # characters already given out
        self.text = ""
        self.stopped = False

    def add(self, ids: list[int], final: bool) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        cuts = [at for stop in self.stops if (at := text.find(stop)) >= 0]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        ready = text
        if not final:
            ready = ready.rstrip("\ufffd")  # an incomplete UTF-8 character so far
            held = 0  # the longest end of `ready` that begins some stop string
            for stop in self.stops:
                for size in range(min(len(stop) - 1, len(ready)), held, -1):
                    if ready.endswith(stop[:size]):
                        held = size
                        break
            ready = ready[: len(ready) - held]
        piece = ready[self.shown :]
        self.shown = max(self.shown, len(ready))
        self.text = text
        return piece


def encode_prompts(
    tokenizer: tok.TextTokenizer, prompts: Sequence[str | Sequence[int]]
) -> list[list[int]]:
    """Token ids of each prompt (text, or already token ids such as a chat template's); an
    empty prompt starts a new document (the end-of-document token)."""
    encode = lambda p: tokenizer.encode(p) if isinstance(p, str) else [int(i) for i in p]
    return [list(encode(p)) or [tokenizer.eod_id] for p in prompts]


def generate(
    setup: steps.ModelSetup,
    params: Any,
    tokenizer: tok.TextTokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = DEFAULT.max_new_tokens,
    temperature: float = DEFAULT.temperature,
    top_k: int = DEFAULT.top_k,
    top_p: float = DEFAULT.top_p,
    seed: int = DEFAULT.seed,
    stop: str | Sequence[str] | None = None,
    stop_at_eod: bool = True,
    chunk: int = TOKENS_PER_CALL,
    stop_ids: Sequence[int] = (),
) -> Iterator[Chunk]:
    """Continue each prompt, yielding `Chunk(row, ids, text, finish)` as tokens are produced.

    Rows are the prompts' indices; each row stops on its own at the end-of-document token
    (unless `stop_at_eod` is False) or another of `stop_ids` (finish "eod" too; the token is
    not shown), at `stop` (one string or several; the text is cut before the first), after
    `max_new_tokens`, or when the context is full. A prompt is text or token ids. `tokenizer`:
    encode, decode, eod_id and vocab_size of a `gptjax.data.tokenizer.TextTokenizer`
    (SentencePiece or byte-level BPE)."""
    sampling = Sampling(temperature, top_k, top_p)
    if stop == "" or (not isinstance(stop, str) and "" in (stop or ())):
        raise ConfigError("stop is empty; give the text to stop at, or none")
    ids = encode_prompts(tokenizer, prompts)
    generator = Generator(setup, params, chunk)
    texts = [_TextRow(tokenizer, stop) for _ in prompts]
    halt = np.zeros(len(prompts), bool)  # finished rows, as the host sees them
    eod = [tokenizer.eod_id] if stop_at_eod else []
    eod = [*eod, *stop_ids] or None
    calls = generator.stream(ids, max_new_tokens, sampling, seed, eod, tokenizer.vocab_size, halt)
    for tokens, emitted, reasons in calls:
        for row, text in enumerate(texts):
            if halt[row]:
                continue
            new = tokens[row][emitted[row]].tolist()
            piece = text.add(new, bool(reasons[row]))
            finish = Finish.STOP if text.stopped else Finish.of_code(reasons[row])
            if new or piece or finish:
                yield Chunk(row, new, piece, finish)
            halt[row] = finish is not None


def complete(setup, params, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """The continuation of each prompt as one string (see `generate` for the settings)."""
    out = [""] * len(prompts)
    for piece in generate(setup, params, tokenizer, prompts, **kwargs):
        out[piece.row] += piece.text
    return out


def sample(setup, params, tokenizer, prompt: str, **kwargs) -> str:
    """`prompt` followed by its continuation (see `generate`)."""
    return prompt + complete(setup, params, tokenizer, [prompt], **kwargs)[0]
