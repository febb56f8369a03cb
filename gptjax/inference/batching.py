"""Continuous batching for `gptjax serve`: running requests share one decode batch.

The engine owns one KV cache of `rows` slots (attention.py's cache with one write index per
row) and one thread that drives it:

1. Between device calls, each waiting request takes a free slot: its prompt is prefilled alone
   (one row, left-padded to its length bucket, as generate.py prefills), moved to the slot's
   first positions and written into the slot (one jitted call; the slot is a traced number, so
   nothing compiles per request or per slot).
2. One jitted decode call advances every running row by up to `chunk` tokens (one token when a
   row has just joined: a short time to first token; sooner when a row finishes while requests
   wait, so its slot is given at once). Each row keeps its own sampling settings, stop ids,
   token limit and seed: row r's n-th token uses the key fold_in(fold_in(key(seed_r), 0), n),
   the key a request alone gets from generate.py (row 0).
3. The host turns each row's new tokens into text, looks for its stop strings and hands the
   pieces to its request. A finished, stopped, timed-out or abandoned (client gone) request
   frees its slot before the next call.

A row's computation reads only its own slot (its keys sit in its slots 0..n-1 whatever the
other rows hold) and every call has the same shapes, so a request gets the same tokens, bit for
bit, alone or batched with any others, in any slot (tests/test_serve_batching.py).

Other work (scored completions: gptjax/inference/completions.py) runs on the same thread between
decode calls, one job at a time (`exclusive`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.core import model
from gptjax.inference import generate, metrics
from gptjax.inference.chatbot import Piece
from gptjax.inference.generate import MAX_STOP_IDS, _TextRow, bucket
from gptjax.inference.settings import TOKENS_PER_CALL, Finish, Settings

_DONE = object()
_GONE = Finish.EOD.code  # the reason a row with no request holds (it never runs)


class QueueFull(Exception):
    """Every slot is busy and --max-queue requests already wait (503, Retry-After)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry later")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """A request ran past --request-timeout (queued or generating)."""


# --- the two jitted programs --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "state"))
def _admit(params, cache, state, tokens_1P, length, slot, max_new, *, graphdef):
    """Prefill one left-padded prompt alone and move it into row `slot`: its tokens in the
    slot's positions 0..length-1, the rest of the slot empty; its next-token logits in
    state["logits"][slot]."""
    gpt = nnx.merge(graphdef, params)
    P = tokens_1P.shape[1]
    start = P - length
    column = jnp.arange(P)[None]
    segments = (column >= start).astype(jnp.int32)
    positions = jnp.maximum(column - start, 0)
    fresh = model.init_cache(gpt.cfg, 1, P)
    logits, fresh = gpt.extend(tokens_1P, positions, fresh, segments, last_only=True)
    fresh = model.shift_cache(fresh, start)  # the padding out: the prompt at slots 0..length-1
    put = lambda big, one: jax.lax.dynamic_update_slice(
        big, one.astype(big.dtype), (0, slot) + (0,) * (big.ndim - 2)
    )  # fmt: skip
    row_segments = jnp.zeros((1, cache["segment_ids"].shape[1]), jnp.int32)
    row_segments = jax.lax.dynamic_update_slice(row_segments, fresh["segment_ids"], (0, 0))
    cache = {
        "k": tuple(put(a, b) for a, b in zip(cache["k"], fresh["k"], strict=True)),
        "v": tuple(put(a, b) for a, b in zip(cache["v"], fresh["v"], strict=True)),
        "segment_ids": jax.lax.dynamic_update_slice(cache["segment_ids"], row_segments, (slot, 0)),
        "index": cache["index"].at[slot].set(length),
    }
    reason = jnp.where(max_new > 0, 0, Finish.LENGTH.code).astype(jnp.int32)
    state = {
        "logits": state["logits"].at[slot].set(logits[0, -1]),
        "length": state["length"].at[slot].set(length),
        "new": state["new"].at[slot].set(0),
        "reason": state["reason"].at[slot].set(reason),
    }
    return model.constrain_cache(cache), state


@functools.partial(
    jax.jit, static_argnames=("graphdef", "chunk", "vocab"), donate_argnames=("cache", "state")
)
def _decode(params, cache, state, settings, halt_B, count, hurry, *, graphdef, chunk, vocab):
    """Up to min(chunk, count) tokens for every running row; stops early when no row runs, or,
    with `hurry` (requests wait for a slot), as soon as one row finishes.

    Returns (tokens [B, chunk], emitted [B, chunk], reasons [B], cache, state), as
    generate._decode. Per row: settings temperature, top_k, top_p, max_new, seed [B] and
    eod [B, MAX_STOP_IDS] (-1 pads); `halt_B` ends rows (a stop string, a request gone)."""
    gpt = nnx.merge(graphdef, params)
    seq_len = gpt.cfg.seq_len
    B = halt_B.shape[0]
    # the key a request alone gets as generate.py's row 0
    row_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(settings["seed"])
    reason0 = jnp.where(halt_B & (state["reason"] == 0), _GONE, state["reason"])
    started = reason0 == 0
    state = dict(state, reason=reason0)

    def running(carry):
        i, state, *_ = carry
        freed = jnp.any(started & (state["reason"] != 0))
        go = (i < jnp.minimum(count, chunk)) & jnp.any(state["reason"] == 0)
        return go & ~(hurry & freed)

    def step(carry):
        i, state, cache, tokens, emitted = carry
        token, shown, rows = generate.next_token(state, row_keys, settings, vocab, seq_len)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        emitted = jax.lax.dynamic_update_slice(emitted, shown[:, None], (0, i))
        keep = rows["reason"] == 0  # the rows still running append their token (others padding)
        position = jnp.clip(rows["length"] - 1, 0, seq_len - 1)
        cache = dict(cache, index=position)
        logits, cache = gpt.extend(token[:, None], position[:, None], cache, keep[:, None])
        return i + 1, dict(rows, logits=logits[:, 0]), model.constrain_cache(cache), tokens, emitted

    tokens = jnp.zeros((B, chunk), jnp.int32)
    emitted = jnp.zeros((B, chunk), bool)
    _, state, cache, tokens, emitted = jax.lax.while_loop(
        running, step, (jnp.zeros((), jnp.int32), state, cache, tokens, emitted)
    )
    return tokens, emitted, state["reason"], cache, state


def _to_stop(text: _TextRow, n_new: int) -> int:
    """How many of the last `n_new` ids of a stopped row it took to reach the stop string (the
    rest came in the same device call; they do not count, so a request's usage does not depend
    on how its tokens were split into calls)."""
    before = len(text.ids) - n_new
    for k in range(1, n_new):
        done = text.tokenizer.decode(text.ids[: before + k])
        if any(stop in done for stop in text.stops):
            return k
    return n_new


# --- requests -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One request: what to generate and where its pieces go."""

    ids: list[int]
    settings: Settings
    stops: list[str]
    stop_ids: list[int]
    loop: Any
    out: asyncio.Queue
    route: str
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: Any = None
    first_token: float | None = None
    slot: int | None = None

    def send(self, item) -> None:
        if self.loop is None:  # a warm-up: nobody listens
            return
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutting down)
            self.cancelled.set()


@dataclass(eq=False)
class _Exclusive:
    make: Callable[[], Iterator[Any]]
    loop: Any
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    send = _Job.send


class Engine:
    """The continuous-batching generator of one chat model (`bot`: a chatbot.Chatbot or
    anything with its setup, params, tokenizer and chunk): `rows` slots, at most `max_queue`
    requests waiting, each request ended after `timeout` seconds (None: never).

    `submit` (from an event loop) queues a generation and returns its pieces as an async
    iterator; leaving the iteration early (a client gone) frees the request's slot."""

    def __init__(
        self,
        bot,
        rows: int = 8,
        max_queue: int = 64,
        timeout: float | None = None,
        chunk: int | None = None,
        start: bool = True,
    ):
        self.bot, self.timeout, self.max_queue = bot, timeout, max_queue
        self.setup, self.params, self.tokenizer = bot.setup, bot.params, bot.tokenizer
        self.chunk = chunk or getattr(bot, "chunk", TOKENS_PER_CALL)
        self.generator = generate.Generator(self.setup, self.params, self.chunk)
        multiple = self.generator.row_multiple
        self.rows = -(-max(rows, 1) // multiple) * multiple
        self.cfg = self.setup.cfg.model
        self.vocab = min(self.tokenizer.vocab_size, self.cfg.vocab)
        self.slots: list[_Job | None] = [None] * self.rows
        self.waiting: collections.deque[_Job] = collections.deque()
        self.exclusive_jobs: collections.deque[_Exclusive] = collections.deque()
        self.wake = threading.Condition()
        self._host_settings()
        self._metrics()
        self.cache = self.state = None
        # tests: a threading.Semaphore the engine's thread takes one permit of before each turn
        self.gate: threading.Semaphore | None = None
        if start:
            self.start()

    # --- the device state ---

    def _host_settings(self) -> None:
        B = self.rows
        self.host = {
            "temperature": np.zeros(B, np.float32),
            "top_k": np.zeros(B, np.int32),
            "top_p": np.ones(B, np.float32),
            "max_new": np.zeros(B, np.int32),
            "seed": np.zeros(B, np.int32),
            "eod": np.full((B, MAX_STOP_IDS), -1, np.int32),
        }
        self.device_settings = None

    def _empty(self) -> None:
        """The cache and decoding state of `rows` empty slots, on the mesh."""
        B, cfg = self.rows, self.cfg
        with self.setup.activate():
            self.cache = jax.jit(lambda: model.constrain_cache(model.init_cache(cfg, B)))()
            self.cache["index"] = jax.device_put(np.zeros(B, np.int32), self.generator._rows)
        rows = lambda a: jax.device_put(a, self.generator._rows)
        self.state = {
            "logits": jax.device_put(
                np.zeros((B, cfg.vocab_size), np.float32), self.generator._rows2
            ),
            "length": rows(np.ones(B, np.int32)),
            "new": rows(np.zeros(B, np.int32)),
            "reason": rows(np.full(B, _GONE, np.int32)),
        }

    def _put_settings(self):
        if self.device_settings is None:
            rows = lambda a: jax.device_put(a, self.generator._rows)
            eod = jax.device_put(self.host["eod"], self.generator._rows2)
            self.device_settings = {
                **{k: rows(v) for k, v in self.host.items() if k != "eod"},
                "eod": eod,
            }
        return self.device_settings

    # --- metrics ---

    def _metrics(self) -> None:
        self.requests = metrics.Counter(
            "gptjax_requests_total", "Requests answered, by route and outcome."
        )
        self.tokens = metrics.Counter("gptjax_generated_tokens_total", "New tokens generated.")
        self.ttft = metrics.Histogram(
            "gptjax_time_to_first_token_seconds", "From arrival to the first new token."
        )
        self.latency = metrics.Histogram(
            "gptjax_request_latency_seconds", "From arrival to the last new token."
        )
        self.calls = metrics.Counter("gptjax_decode_calls_total", "Device decode calls.")

    def metrics(self) -> list:
        gauges = [
            metrics.Gauge("gptjax_queue_depth", "Requests waiting for a slot.", self.queued),
            metrics.Gauge("gptjax_running_rows", "Requests generating now.", self.running),
            metrics.Gauge("gptjax_max_batch", "Rows of the decode batch.", lambda: self.rows),
        ]
        return [self.requests, *gauges, self.tokens, self.calls, self.ttft, self.latency]

    def queued(self) -> int:
        return len(self.waiting) + len(self.exclusive_jobs)

    def running(self) -> int:
        return sum(job is not None for job in self.slots)

    # --- the API (an event loop's side) ---

    def warm(self, ids: Sequence[int]) -> None:
        """Compile the decode program and `ids`' prefill (before `start`, on this thread): a
        two-token generation that nothing receives."""
        if self.cache is None:
            self._empty()
        job = _Job(list(ids), Settings(max_new_tokens=2), [], [], None, None, "warm", math.inf)
        self._admit(job, 0)
        self._decode_once(fresh=True)
        self._end(job, "warm")
        self.device_settings = None

    def start(self) -> None:
        threading.Thread(target=self._loop, name="gptjax-batching", daemon=True).start()

    def submit(
        self,
        ids: Sequence[int],
        settings: Settings,
        stops: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
        route: str = "generate",
    ) -> AsyncIterator[Piece]:
        """Queue a generation of `ids`' continuation (ends at the end-of-document token or one
        of `stop_ids`, a stop string, max_new_tokens or the context's end); QueueFull when
        --max-queue requests wait already."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if self.timeout is None else time.monotonic() + self.timeout
        eod = [self.tokenizer.eod_id, *stop_ids]
        job = _Job(list(ids), settings, list(stops), eod, loop, asyncio.Queue(), route, deadline)
        with self.wake:
            if self.queued() >= self.max_queue:
                self.requests.inc(route=route, outcome="queue_full")
                raise QueueFull(self.queued(), retry_after=1)
            self.waiting.append(job)
            self.wake.notify()
        return self._pieces(job)

    def exclusive(self, make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Run `make()` on the engine's thread between decode calls (scored completions);
        iterate the result to receive what it yields."""
        job = _Exclusive(make, asyncio.get_running_loop(), asyncio.Queue())
        with self.wake:
            if self.queued() >= self.max_queue:
                self.requests.inc(route="scored", outcome="queue_full")
                raise QueueFull(self.queued(), retry_after=1)
            self.exclusive_jobs.append(job)
            self.wake.notify()
        return self._pieces(job)

    async def _pieces(self, job):
        try:
            while (item := await job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # finished, or the client went away: its row is free at once
            job.cancelled.set()
            with self.wake:
                if isinstance(job, _Job) and job.slot is not None:
                    self._end(job, "cancelled")
                elif job in self.waiting:
                    self.waiting.remove(job)
                    self.requests.inc(route=job.route, outcome="cancelled")
                self.wake.notify()

    # --- the engine's thread ---

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.exclusive_jobs or self.running()):
                    self.wake.wait()
            if (gate := self.gate) is not None:
                gate.acquire()
            try:
                if self.cache is None:
                    self._empty()
                self.cycle()
            except Exception as error:  # noqa: BLE001 - handed to every request, then go on
                self._fail_all(error)

    def cycle(self) -> None:
        """One turn: exclusive jobs, expired and abandoned requests out, waiting requests in,
        then one decode call for the running rows."""
        while self.exclusive_jobs:
            self._run_exclusive(self.exclusive_jobs.popleft())
        now = time.monotonic()
        for job in list(self.slots):
            if job is not None and now > job.deadline:
                self._end(job, "timeout")
        with self.wake:
            late = [job for job in self.waiting if now > job.deadline]
            for job in late:
                self.waiting.remove(job)
        for job in late:
            self.requests.inc(route=job.route, outcome="timeout")
            job.send(RequestTimeout("the request waited past --request-timeout"))
        fresh = self._admit_waiting(now)
        if self.running():
            self._decode_once(fresh)

    def _admit_waiting(self, now: float) -> bool:
        fresh = False
        while None in self.slots:
            with self.wake:
                job = self.waiting.popleft() if self.waiting else None
            if job is None:
                break
            if job.cancelled.is_set():
                self.requests.inc(route=job.route, outcome="cancelled")
                continue
            if now > job.deadline:
                self.requests.inc(route=job.route, outcome="timeout")
                job.send(RequestTimeout("the request waited past --request-timeout"))
                continue
            try:
                self._admit(job, self.slots.index(None))
            except Exception as error:
                self.requests.inc(route=job.route, outcome="error")
                job.send(error)  # then the others, and the cache starts over (`_loop`)
                raise
            fresh = True
        return fresh

    def _admit(self, job: _Job, slot: int) -> None:
        s, cfg = job.settings, self.cfg
        ids = job.ids
        P = bucket(len(ids), cfg.seq_len)
        tokens = np.zeros((1, P), np.int32)
        tokens[0, P - len(ids) :] = ids
        host = self.host
        host["temperature"][slot], host["top_k"][slot] = s.temperature, s.top_k
        host["top_p"][slot], host["max_new"][slot], host["seed"][slot] = (
            s.top_p,
            s.max_new_tokens,
            s.seed,
        )
        host["eod"][slot] = -1
        host["eod"][slot, : len(job.stop_ids)] = job.stop_ids
        self.device_settings = None
        put = jax.device_put
        scalar = self.generator._scalar
        with self.setup.activate():
            self.cache, self.state = _admit(
                self.params, self.cache, self.state,
                put(tokens, scalar),
                put(np.int32(len(ids)), scalar), put(np.int32(slot), scalar),
                put(np.int32(s.max_new_tokens), scalar), graphdef=self.setup.graphdef,
            )  # fmt: skip
        job.text = _TextRow(self.tokenizer, job.stops or None)
        with self.wake:
            if job.cancelled.is_set():  # gone while it was prefilled
                self.requests.inc(route=job.route, outcome="cancelled")
                return
            job.slot, self.slots[slot] = slot, job

    def _decode_once(self, fresh: bool) -> None:
        jobs = list(self.slots)
        halt = np.array([job is None for job in jobs])
        put = jax.device_put
        with self.wake:
            hurry = bool(self.waiting)
        count = 1 if fresh else self.chunk
        with self.setup.activate():
            tokens, emitted, reasons, self.cache, self.state = _decode(
                self.params, self.cache, self.state, self._put_settings(),
                put(halt, self.generator._rows), put(np.int32(count), self.generator._scalar),
                put(np.bool_(hurry), self.generator._scalar),
                graphdef=self.setup.graphdef, chunk=self.chunk, vocab=self.vocab,
            )  # fmt: skip
        tokens, emitted, reasons = np.asarray(tokens), np.asarray(emitted), np.asarray(reasons)
        self.calls.inc()
        now = time.monotonic()
        for slot, job in enumerate(jobs):
            if job is None or self.slots[slot] is not job:  # none, or gone during the call
                continue
            new = tokens[slot][emitted[slot]].tolist()
            piece = job.text.add(new, bool(reasons[slot]))
            finish = Finish.STOP if job.text.stopped else Finish.of_code(reasons[slot])
            if job.text.stopped:  # the tokens up to the one that completes the stop string
                new = new[: _to_stop(job.text, len(new))]
            if new:
                self.tokens.inc(len(new))
                if job.first_token is None:
                    job.first_token = now
                    self.ttft.observe(now - job.arrived)
            if new or piece or finish:
                job.send(Piece(piece, len(new), finish.reply if finish else None))
            if finish is not None:
                self._end(job, "ok" if job.loop is not None else "warm")

    def _end(self, job: _Job, outcome: str) -> None:
        """Free the job's slot (once); tell its request how it ended."""
        with self.wake:
            if job.slot is None or self.slots[job.slot] is not job:
                return
            self.slots[job.slot] = None
        if outcome == "warm":
            return
        self.requests.inc(route=job.route, outcome=outcome)
        if outcome == "ok":
            self.latency.observe(time.monotonic() - job.arrived)
            job.send(_DONE)
        elif outcome == "timeout":
            job.send(RequestTimeout("the request ran past --request-timeout"))

    def _run_exclusive(self, job: _Exclusive) -> None:
        if job.cancelled.is_set():
            return
        try:
            for item in job.make():
                job.send(item)
                if job.cancelled.is_set():
                    break
            job.send(_DONE)
            self.requests.inc(route="scored", outcome="ok")
        except Exception as error:  # noqa: BLE001 - answered as a 500
            self.requests.inc(route="scored", outcome="error")
            job.send(error)

    def _fail_all(self, error: Exception) -> None:
        """A device call failed: every running request gets the error; the cache starts over."""
        for job in list(self.slots):
            if job is not None:
                with self.wake:
                    self.slots[job.slot] = None
                self.requests.inc(route=job.route, outcome="error")
                job.send(error)
        self.cache = self.state = None  # made again at the next turn
