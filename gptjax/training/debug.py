"""Single-device debug mode: the config it runs and the flags it sets (the per-step checks and
timings are the step monitor's, gptjax/training/monitor.py).

`gptjax train CONFIG --debug` (or `debug.enabled=true`) runs any config on the first local
device with mesh 1×1×1 and:
- jax_debug_nans plus a finiteness check of loss and gradient norm after every step; a NaN is
  traced back to the operation that produced it (the step is re-run eagerly) and the step named;
- jax_log_compiles: every compilation is logged, as information from gptjax's logger;
- a parameter table (path, shape, dtype, sharding, size) at start;
- per step: its wall time split into waiting for data, the step on the device, evaluation,
  checkpoint saves and the rest on the host (the parts add up to the wall time); at the end the
  totals, and the run's wall time split into before the first step, the steps, and after;
- `debug.no_jit=true`: jax.disable_jit, so `breakpoint()` inside the model stops with concrete
  arrays;
- from the command line (`gptjax train`), a run of `debug.steps` steps (default 10) unless
  `train.steps` or `train.stop_at` is given there: a cluster config's 10,000 steps would take
  days on one device. The run stops there as `train.stop_at` does (with a checkpoint, on the
  config's own learning-rate schedule), and says so.

Steps are named 1-based, as in metrics.jsonl: "step 12" is the update whose loss is logged as 12.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from gptjax import distributed
from gptjax.config import Config, ConfigError
from gptjax.training import monitor

_COMPILE_LOGGERS = ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax._src.compiler")
_COMPILE_MESSAGES = ("Compiling ", "Finished ", "Persistent compilation cache")
compile_log = logging.getLogger("gptjax.compile")


class _CompileLog(logging.Filter):
    """jax_log_compiles makes JAX log every trace and compile as a WARNING of its own loggers;
    they are information: re-logged as INFO of gptjax's logger ("gptjax.compile"), each cut to
    200 characters (JAX lists every argument's sharding). JAX's other records pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno > logging.WARNING or not message.startswith(_COMPILE_MESSAGES):
            return True
        if len(message) > 200:
            message = message[:200] + " ..."
        compile_log.info("%s", message)
        return False


_COMPILE_FILTER = _CompileLog()


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


def cap_steps(cfg: Config, given: set[str]) -> tuple[Config, str | None]:
    """Debug mode from the command line: stop after `debug.steps` unless the command line gives
    `train.steps` or `train.stop_at` (`given`: the dotted keys it overrides). Returns the config
    to run and the line saying so (None when nothing is capped)."""
    if not cfg.debug.enabled or given & {"train.steps", "train.stop_at"}:
        return cfg, None
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    if end <= cfg.debug.steps:
        return cfg, None
    capped = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"stop_at": cfg.debug.steps})}
    )
    return capped, (
        f"gptjax: debug mode: stopping after {cfg.debug.steps} of the config's "
        f"{cfg.train.steps:,} steps (debug.steps); give train.steps=N to run N"
    )


def devices(cfg: Config) -> list | None:
    """The devices to build the mesh on: the first local device in debug mode, else all."""
    if not cfg.debug.enabled:
        return None
    import jax

    return jax.local_devices()[:1]


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[None]:
    """Debug flags (NaN checks, compile logging, no-jit) and the step watchdog, for one run."""
    import jax

    with monitor.watching(cfg), contextlib.ExitStack() as stack:
        if cfg.debug.enabled:
            stack.enter_context(jax.debug_nans(cfg.debug.nans))
            stack.enter_context(jax.log_compiles(cfg.debug.log_compiles))
            for name in _COMPILE_LOGGERS:
                logger = logging.getLogger(name)
                logger.addFilter(_COMPILE_FILTER)
                stack.callback(logger.removeFilter, _COMPILE_FILTER)
            if cfg.debug.no_jit:
                stack.enter_context(jax.disable_jit())
        yield
