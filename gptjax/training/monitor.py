"""The per-step monitor every run uses: the step watchdog, and in debug mode each step's time
split, finiteness checks and the NaN's source.

Steps are named 1-based, as in metrics.jsonl: "step 12" is the update whose loss is logged as 12.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from gptjax import distributed
from gptjax.config import Config

_WATCHDOG: contextvars.ContextVar[distributed.Watchdog | None] = contextvars.ContextVar(
    "gptjax_watchdog", default=None
)


# (start, [loop start, loop end]) of the debug session in progress: the monitor fills the list.
_CLOCK: contextvars.ContextVar[tuple[float, list[float]] | None] = contextvars.ContextVar(
    "gptjax_clock", default=None
)

# The parts of a step's wall time; "host" is the rest (logging, the NaN check's copy, Python).
PARTS = ("data", "device", "eval", "checkpoint", "host")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinity (debug mode); the message names the step and op."""


@contextlib.contextmanager
def watching(cfg: Config) -> Iterator[None]:
    """The step watchdog for one run and, in debug mode, the clock of its wall time split."""
    watchdog = distributed.Watchdog(cfg.train.step_timeout)
    token = _WATCHDOG.set(watchdog)
    loop: list[float] = []
    clock = _CLOCK.set((time.perf_counter(), loop) if cfg.debug.enabled else None)
    try:
        yield
    finally:
        watchdog.close()
        _WATCHDOG.reset(token)
        start = _CLOCK.get()
        _CLOCK.reset(clock)
        if start is not None and len(loop) == 2:
            now, (first, last) = time.perf_counter(), loop
            print(
                f"debug: wall {now - start[0]:.3f} s = before the first step {first - start[0]:.3f}"
                f" s (data, restore, initialisation) + steps {last - first:.3f} s + after the "
                f"last step {now - last:.3f} s (the last checkpoint's write)",
                file=sys.stderr,
                flush=True,
            )


def param_table(abstract_params: Any) -> str:
    """One row per parameter: path, shape, dtype, sharding spec, elements; then the total."""
    from gptjax.core import model

    rows = [("parameter", "shape", "dtype", "sharding", "elements")]
    total, total_bytes = 0, 0
    for name, leaf in model.by_name(abstract_params).items():
        size = math.prod(leaf.shape)
        total += size
        total_bytes += size * leaf.dtype.itemsize
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        rows.append((name, str(tuple(leaf.shape)), str(leaf.dtype), str(spec), f"{size:,}"))
    rows.append(("total", "", "", "", f"{total:,} ({total_bytes / 2**20:.1f} MiB)"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _frame(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    if path.startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)
    return f"{path}:{frame.lineno} ({frame.name})"


def _where(error: BaseException) -> str:
    """' at file:line (fn), called from gptjax/x.py:line (fn)': the deepest frames outside JAX."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/jax/" not in f.filename]
    if not frames:
        return ""
    text = f" at {_frame(frames[-1])}"
    ours = [f for f in frames if f"{os.sep}gptjax{os.sep}" in f.filename]
    if ours and ours[-1] is not frames[-1]:
        text += f", called from {_frame(ours[-1])}"
    return text


class StepMonitor:
    """Per-step hooks for the training loop: watchdog progress, and in debug mode timings,
    finiteness checks and NaN localisation. Call `begin(step)` (0-based loop index) at the top
    of each iteration, run the step and eval functions through `wrap`, and evaluation and
    checkpoint saves inside `phase("eval")` / `phase("checkpoint")`.

    A step's wall time runs from its `begin` to the next one (or `close`): data is `begin` to
    the step's call (reading the batch), device the step itself (blocked on), eval and
    checkpoint their phases, and host the rest, so the parts add up to the wall time."""

    def __init__(self, cfg: Config, setup: Any = None, lead: bool = True):
        self.debug = cfg.debug.enabled
        self.check = cfg.debug.enabled and cfg.debug.nans
        self.lead = lead
        self.watchdog = _WATCHDOG.get() or distributed.Watchdog(0)
        self.index = 0
        self.seen: set[int] = set()  # functions already called once (compiled)
        self.times: list[dict[str, float]] = []  # per finished step: PARTS and "wall", seconds
        self.done_at: dict[int, float] = {}  # debug mode: step -> when it completed (perf_counter)
        self._open: dict[str, float] | None = None  # the step in progress: its parts so far
        self._begin = 0.0
        self._clock = _CLOCK.get()
        if self.debug and lead and setup is not None:
            device = setup.mesh.devices.flat[0]
            self._say(f"debug: one device ({device}), mesh data=1 fsdp=1 tensor=1")
            self._say(param_table(setup.abstract_state["params"]))

    def _say(self, text: str) -> None:
        if self.lead:
            print(text, file=sys.stderr, flush=True)

    def begin(self, index: int) -> None:
        """Iteration `index` (0-based) starts: it will load a batch and dispatch step index+1."""
        now = time.perf_counter()
        self._finish_timing(now)
        self.index, self._begin = index, now
        if self.debug:
            self._open = dict.fromkeys(PARTS[:-1], 0.0)
            if self._clock is not None and not self._clock[1]:
                self._clock[1].append(now)  # the loop starts
        self.watchdog.pet(f"the batch of step {index + 1}")

    @contextlib.contextmanager
    def phase(self, part: str) -> Iterator[None]:
        """Time the block as `part` ("eval" or "checkpoint") of the step in progress."""
        if self._open is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._open[part] += time.perf_counter() - start

    def _finish_timing(self, now: float) -> None:
        if self._open is None:
            return
        parts, self._open = self._open, None
        wall = now - self._begin
        parts["host"] = wall - sum(parts.values())
        self.times.append({**parts, "wall": wall})
        note = " (includes compilation)" if len(self.times) == 1 else ""
        split = " + ".join(f"{name} {parts[name] * 1e3:.1f}" for name in PARTS)
        self._say(f"debug: step {self.index + 1}: wall {wall * 1e3:.1f} ms = {split} ms{note}")

    def wrap(self, fn: Callable, kind: str = "train") -> Callable:
        """`fn(state_or_params, batch)` with the monitor around it; kind: train | eval."""

        def run(first, batch):
            is_first_call = id(run) not in self.seen
            self.seen.add(id(run))
            if is_first_call:
                self.watchdog.pause()  # compilation time is not a hang
            elif kind == "train":
                # Without debug mode steps run ahead of the host: dispatching step n may wait
                # for step n-1, the most recent one dispatched.
                self.watchdog.pet(f"step {self.index + (1 if self.debug else 0)}")
            else:
                self.watchdog.pet(f"an evaluation batch after step {self.index + 1}")
            if kind != "train" or not self.debug:
                out = fn(first, batch)
                what = f"step {self.index + 1}" if kind == "train" else "an evaluation"
                self.watchdog.pet(what)  # the loop now waits for this step (or the one before)
                return out
            return self._debug_step(fn, first, batch)

        return run

    def _debug_step(self, fn, state, batch):
        import jax
        import jax.numpy as jnp

        step = self.index + 1
        called = time.perf_counter()
        if self._open is not None:
            self._open["data"] += called - self._begin  # the batch was read since `begin`
        spare = jax.tree.map(jnp.copy, (state, batch)) if self.check else None  # state is donated
        jax.block_until_ready(spare)  # the copy is host time: neither data nor the step
        start = time.perf_counter()
        try:
            new_state, stats = jax.block_until_ready(fn(state, batch))
        except FloatingPointError as error:
            raise self._locate(fn, spare, step, error) from error
        finally:
            self.done_at[step] = end = time.perf_counter()
            if self._open is not None:
                self._open["device"] += end - start
        self.watchdog.pet(f"the host work after step {step}")
        if self.check:
            bad = {k: float(v) for k, v in stats.items() if not math.isfinite(float(v))}
            if bad:
                raise NonFiniteError(f"step {step}: non-finite {bad} (debug finiteness check)")
        return new_state, stats

    def _locate(self, fn, spare, step: int, error: FloatingPointError) -> NonFiniteError:
        """Re-run the failed step eagerly so jax_debug_nans stops at the producing operation."""
        import jax

        if spare is not None and not jax.config.jax_disable_jit:
            self._say(f"debug: step {step} produced a NaN; re-running it eagerly to find the op")
            try:
                with jax.disable_jit():
                    fn(*spare)
            except FloatingPointError as eager:
                error = eager
        return NonFiniteError(f"step {step}: {error}{_where(error)}")

    def close(self) -> None:
        """End of training: the last step's timing, the totals and the mean of the steps after
        the first (debug mode); means add up, as the parts of each step do."""
        self.watchdog.pause()  # the final checkpoint wait is not a step
        now = time.perf_counter()
        self._finish_timing(now)
        if self._clock is not None and len(self._clock[1]) == 1:
            self._clock[1].append(now)  # the loop ends
        if not (self.debug and self.times):
            return
        keys = (*PARTS, "wall")
        total = {k: sum(t[k] for t in self.times) for k in keys}
        split = " + ".join(f"{name} {total[name]:.3f}" for name in PARTS)
        self._say(
            f"debug: {len(self.times)} steps: wall {total['wall']:.3f} s = {split} s "
            f"(step 1, with compilation: {self.times[0]['wall']:.3f} s)"
        )
        steady = self.times[1:]
        if steady:
            mean = {k: sum(t[k] for t in steady) / len(steady) * 1e3 for k in keys}
            split = " + ".join(f"{name} {mean[name]:.1f}" for name in PARTS)
            self._say(
                f"debug: mean of the {len(steady)} steps after the first: wall "
                f"{mean['wall']:.1f} ms = {split} ms"
            )
