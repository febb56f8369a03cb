"""Single-device debug mode and the per-step monitor (watchdog, NaN hunting, time split).

`gptjax train CONFIG --debug` (or `debug.enabled=true`) runs any config on the first local
device with mesh 1×1×1 and:
- jax_debug_nans plus a finiteness check of loss and gradient norm after every step; a NaN is
  traced back to the operation that produced it (the step is re-run eagerly) and the step named;
- jax_log_compiles: every compilation is logged;
- a parameter table (path, shape, dtype, sharding, size) at start;
- per step: milliseconds waiting for data, on the device, and on the host (the rest);
- `debug.no_jit=true`: jax.disable_jit, so `breakpoint()` inside the model stops with concrete
  arrays.

Steps are named 1-based, as in metrics.jsonl: "step 12" is the update whose loss is logged as 12.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from gptjax import distributed
from gptjax.config import Config, ConfigError

_WATCHDOG: contextvars.ContextVar[distributed.Watchdog | None] = contextvars.ContextVar(
    "gptjax_watchdog", default=None
)


_COMPILE_LOGGERS = ("jax._src.interpreters.pxla", "jax._src.dispatch")


class _ShortCompileLog(logging.Filter):
    """jax_log_compiles lists every argument's sharding; keep the first 200 characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("Compiling ", "Finished ")) and len(message) > 200:
            record.msg, record.args = message[:200] + " ...", None
        return True


_SHORT = _ShortCompileLog()


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinity (debug mode); the message names the step and op."""


def apply(cfg: Config) -> Config:
    """The config debug mode runs: mesh forced to 1×1×1 (one device, one process)."""
    if not cfg.debug.enabled:
        return cfg
    if distributed.resolve().num_processes > 1:
        raise ConfigError(
            "debug mode runs in one process on one device; start it directly, not under "
            "the launcher or srun with several tasks"
        )
    return cfg.model_copy(update={"mesh": cfg.mesh.one_device()})


def devices(cfg: Config) -> list | None:
    """The devices to build the mesh on: the first local device in debug mode, else all."""
    if not cfg.debug.enabled:
        return None
    import jax

    return jax.local_devices()[:1]


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[None]:
    """Debug flags (NaN checks, compile logging, no-jit) and the watchdog, for one run."""
    import jax

    watchdog = distributed.Watchdog(cfg.train.step_timeout)
    token = _WATCHDOG.set(watchdog)
    try:
        with contextlib.ExitStack() as stack:
            if cfg.debug.enabled:
                stack.enter_context(jax.debug_nans(cfg.debug.nans))
                stack.enter_context(jax.log_compiles(cfg.debug.log_compiles))
                for name in _COMPILE_LOGGERS:
                    logger = logging.getLogger(name)
                    logger.addFilter(_SHORT)
                    stack.callback(logger.removeFilter, _SHORT)
                if cfg.debug.no_jit:
                    stack.enter_context(jax.disable_jit())
            yield
    finally:
        watchdog.close()
        _WATCHDOG.reset(token)


def param_table(abstract_params: Any) -> str:
    """One row per parameter: path, shape, dtype, sharding spec, elements; then the total."""
    import jax

    rows = [("parameter", "shape", "dtype", "sharding", "elements")]
    total, total_bytes = 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        size = math.prod(leaf.shape)
        total += size
        total_bytes += size * leaf.dtype.itemsize
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        name = jax.tree_util.keystr(path, simple=True, separator=".")
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
    of each iteration and run the step and eval functions through `wrap`."""

    def __init__(self, cfg: Config, setup: Any = None, lead: bool = True):
        self.debug = cfg.debug.enabled
        self.check = cfg.debug.enabled and cfg.debug.nans
        self.lead = lead
        self.watchdog = _WATCHDOG.get() or distributed.Watchdog(0)
        self.index = 0
        self.seen: set[int] = set()  # functions already called once (compiled)
        self.times: list[tuple[float, float, float]] = []  # (data, device, host) seconds
        self._begin = self._call = self._return = None
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
        self.watchdog.pet(f"the batch of step {index + 1}")

    def _finish_timing(self, now: float) -> None:
        if self.debug and self._return is not None and self._call is not None:
            data, device = self._call - self._begin, self._return - self._call
            host = now - self._return
            self.times.append((data, device, host))
            note = " (includes compilation)" if len(self.times) == 1 else ""
            self._say(
                f"debug: step {self.index + 1}: data {data * 1e3:.1f} ms | device "
                f"{device * 1e3:.1f} ms | host {host * 1e3:.1f} ms{note}"
            )
        self._call = self._return = None

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
        entered = time.perf_counter()
        spare = jax.tree.map(jnp.copy, (state, batch)) if self.check else None  # state is donated
        jax.block_until_ready(spare)
        self._begin += time.perf_counter() - entered  # the copy is neither data nor step time
        self._call = time.perf_counter()
        try:
            new_state, stats = jax.block_until_ready(fn(state, batch))
        except FloatingPointError as error:
            raise self._locate(fn, spare, step, error) from error
        self._return = time.perf_counter()
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
        """End of training: the last step's timing and a median summary (debug mode)."""
        self.watchdog.pause()  # the final checkpoint wait is not a step
        self._finish_timing(time.perf_counter())
        steady = self.times[1:]
        if self.debug and steady:
            median = [sorted(t[i] for t in steady)[len(steady) // 2] * 1e3 for i in range(3)]
            self._say(
                f"debug: median over {len(steady)} steps after the first: data {median[0]:.1f} "
                f"ms | device {median[1]:.1f} ms | host {median[2]:.1f} ms"
            )
