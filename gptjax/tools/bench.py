"""`gptjax bench`: steady-state training throughput, MFU and memory, as one JSON object.

How it is measured: the jitted training step (forward, backward, optimiser update) is compiled
ahead of time (the compile is timed on its own), run `warmup` times, then timed over `timed`
steps (`gptjax bench --steps`), each blocking on its result; the median step time gives
tokens/s. Batches are built before the clock starts, so the host data path is not part of the
number.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from gptjax.config import Config
from gptjax.core import flops, steps
from gptjax.data import batching, loader
from gptjax.data.pipeline import cache_root
from gptjax.training import runs

FLOPS_FORMULA = flops.FLOPS_FORMULA
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def synthetic_rows(cfg: Config, step: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a uniform-random global batch (a batch dict) for `step`."""
    rng = np.random.default_rng((cfg.seed, step))
    shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    windows = rng.integers(0, cfg.model.vocab, shape, dtype=np.int32)[start:stop]
    return batching.from_windows(windows, eod_id=0, packing=cfg.data.packing)


def make_batches(setup: steps.Setup, n: int, data: str) -> list[dict[str, jax.Array]]:
    """`n` distinct global batches, synthetic or from the config's corpus."""
    cfg, B = setup.cfg, setup.cfg.train.batch_size
    if data == "synthetic":
        rows = lambda step: lambda a, b: synthetic_rows(cfg, step, a, b)
    else:
        from pathlib import Path

        dataset = runs.load_data(cfg, Path(cfg.run_dir))
        rows = lambda step: lambda a, b: dataset.train_batch(cfg.seed, step, B, a, b)
    shape = (B, cfg.model.seq_len)
    return [loader.assemble(setup.batch_sharding, shape, rows(step)) for step in range(n)]


def memory_report(devices: list[jax.Device]) -> dict[str, Any]:
    """Peak memory per device in bytes, saying where the number comes from.

    GPUs and TPUs report `peak_bytes_in_use` (the process's peak so far) through
    `device.memory_stats()`; the CPU backend reports nothing, so there the per-device figure is
    null and the process's peak resident set size (all CPU "devices" share it) is given instead.
    """
    stats = devices[0].memory_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if sys.platform == "darwin":
        rss //= 1024  # macOS reports bytes
    if stats and "peak_bytes_in_use" in stats:
        peak = max(int(d.memory_stats().get("peak_bytes_in_use", 0)) for d in devices)
        return {
            "peak_memory_bytes_per_device": peak,
            "peak_memory_source": "device.memory_stats() peak_bytes_in_use (max over devices)",
            "host_peak_rss_bytes": rss,
        }
    return {
        "peak_memory_bytes_per_device": None,
        "peak_memory_source": f"unavailable on {devices[0].platform}; see host_peak_rss_bytes",
        "host_peak_rss_bytes": rss,
    }


def is_out_of_memory(error: BaseException) -> bool:
    return any(marker in str(error) for marker in OOM_MARKERS)


def run(cfg: Config, timed: int = 20, warmup: int = 10, data: str = "synthetic") -> dict[str, Any]:
    """Compile, warm up and time the training step of `cfg`; returns the JSON-ready report.

    Units: seconds, tokens/s, FLOP/s, bytes. `mfu` = tokens/s × FLOPs/token / peak FLOP/s of
    all devices, FLOPs/token by `FLOPS_FORMULA` (flops.flops_per_token).
    """
    if timed < 1 or warmup < 0:
        raise ValueError("bench needs steps >= 1 and warmup >= 0")
    setup = steps.build(cfg)
    batches = make_batches(setup, min(timed + warmup, 4), data)
    report = describe(setup, data)
    try:
        timing = time_steps(setup, batches, timed, warmup)
    except Exception as error:  # noqa: BLE001 - only out-of-memory is reported, not raised
        if not is_out_of_memory(error):
            raise
        return {**report, "error": "out_of_memory", "message": str(error).splitlines()[0]}
    return {**report, **figures(setup, timing, timed, warmup)}


def describe(setup: steps.Setup, data: str) -> dict[str, Any]:
    """What is measured: the devices, the mesh, the batch and the model's settings."""
    cfg, devices = setup.cfg, list(setup.mesh.devices.flat)
    B, T = cfg.train.batch_size, cfg.model.seq_len
    return {
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "mesh": dict(setup.mesh.shape),
        "batch_size": B,
        "seq_len": T,
        "tokens_per_step": B * T,
        "dtype": cfg.model.dtype,
        "remat": cfg.model.remat,
        "attention": setup.model_cfg.attention,
        "loss_chunk": getattr(cfg.model, "loss_chunk", 0),
        "data": data,
    }


@dataclass
class Timing:
    compiled: jax.stages.Compiled
    stats: dict[str, jax.Array]  # the last step's
    compile_s: float
    first_step_s: float  # compile + the first step
    times: list[float]  # each timed step, blocking on its result
    cpu_per_step: float  # process CPU time (all threads) per timed step


def time_steps(setup: steps.Setup, batches: list, timed: int, warmup: int) -> Timing:
    """Compile the step ahead of time, run it `warmup` times, then time `timed` steps."""
    state = steps.init_state(setup)
    step_fn = steps.make_train_step(setup)
    start = time.perf_counter()
    with setup.activate():
        compiled = step_fn.jitted.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, stats = compiled(state, batches[0])
    jax.block_until_ready((state, stats))
    first_step_s = time.perf_counter() - start
    for k in range(warmup):
        state, stats = compiled(state, batches[(k + 1) % len(batches)])
    jax.block_until_ready((state, stats))
    times = []
    cpu_begin = time.process_time()
    for k in range(timed):
        begin = time.perf_counter()
        state, stats = compiled(state, batches[(k + warmup + 1) % len(batches)])
        jax.block_until_ready((state, stats))
        times.append(time.perf_counter() - begin)
    cpu_per_step = (time.process_time() - cpu_begin) / timed
    return Timing(compiled, stats, compile_s, first_step_s, times, cpu_per_step)


def figures(setup: steps.Setup, timing: Timing, timed: int, warmup: int) -> dict[str, Any]:
    """Throughput, MFU and memory from the timed steps."""
    cfg, devices, times = setup.cfg, list(setup.mesh.devices.flat), timing.times
    step_s = statistics.median(times)
    tokens_per_s = cfg.train.batch_size * cfg.model.seq_len / step_s
    flops_token = flops.flops_per_token(cfg.model)
    peak, peak_source = flops.peak_flops(devices, cache_root(cfg.data))
    memory = timing.compiled.memory_analysis()
    estimate = None
    if memory is not None:
        estimate = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        )
    return {
        "params": flops.param_counts(cfg.model)["params"],
        "steps": timed,
        "warmup": warmup,
        "compile_s": timing.compile_s,
        "time_to_first_step_s": timing.first_step_s,
        "step_time_median_s": step_s,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "process_cpu_s_per_step": timing.cpu_per_step,  # all threads; on a busy machine ~ work
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / len(devices),
        "flops_per_token": flops_token,
        "flops_formula": FLOPS_FORMULA,
        "model_flops_per_s": tokens_per_s * flops_token,
        "peak_flops": peak,
        "peak_flops_per_device": peak / len(devices),
        "peak_flops_source": peak_source,
        "mfu": tokens_per_s * flops_token / peak,
        **memory_report(devices),
        "xla_memory_estimate_bytes_per_device": estimate,
        "loss": float(timing.stats["loss"]),
    }
