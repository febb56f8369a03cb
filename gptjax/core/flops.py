"""FLOPs per token (the PaLM convention) and peak FLOP/s: the device table, the CPU measured."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import atomic
from gptjax.config import ModelConfig
from gptjax.core.model import param_counts  # counted from the model's own shapes

# Dense bf16 peak FLOP/s per chip (not the sparse figure). Matched against device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe is 756e12
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


FLOPS_FORMULA = (
    "6N + 12LHQT (PaLM appendix B; N the active parameters without position embeddings; "
    "T is min(W, T) in a local:W layer)"
)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6·N + 12·N_head·d_head·Σ_layers T_l.

    N counts every active parameter except position embeddings (the tied token table counts
    once, as the output projection), so grouped-query attention's smaller key/value projections
    count as they are; a mixture of experts counts top_k of its experts and the whole router
    (model.param_counts' active_params), whatever a capacity pads or drops. The attention
    term counts the score and value products of every query head over the keys a query may
    see, unmasked: T_l = T for a dense layer (the full score matrix,
    as PaLM), min(W, T) for a `local:W` layer (its band).
    """
    counts = param_counts(cfg)
    n = counts["active_params"] - counts["position_params"]
    T = seq_len or cfg.seq_len
    seen = sum(T if w is None else min(w, T) for w in cfg.windows())
    return 6.0 * n + 12.0 * cfg.n_head * cfg.head_dim * seen


def measure_cpu_peak(size: int = 1536, repeats: int = 10) -> float:
    """This machine's f32 matmul FLOP/s through XLA:CPU (all cores): the best of `repeats`."""
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_machine() -> dict[str, Any]:
    """What a CPU peak depends on: the CPU model, the cores this process may use, and how many
    (fake) CPU devices XLA splits them into."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "devices": len(jax.local_devices(backend="cpu"))}


@functools.cache
def cpu_peak(cache_dir: Path | None = None) -> tuple[float, str]:
    """The CPU's f32 matmul peak, measured once per machine and kept in
    cache_dir/cpu_peak/KEY.json (KEY: CPU model, usable cores, CPU devices), so MFU does not
    swing with whatever else the machine runs at the time. Delete the file to measure again."""
    machine = cpu_machine()
    if cache_dir is None:
        return measure_cpu_peak(), "measured f32 matmul (not cached)"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{machine['cpu']}-{machine['cores']}c-")
    path = Path(cache_dir) / "cpu_peak" / f"{name}{machine['devices']}d.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(path.read_text())
        if record["machine"] == machine and record["flops"] > 0:
            return float(record["flops"]), f"measured f32 matmul, cached in {path}"
    flops = measure_cpu_peak()
    record = {"machine": machine, "flops": flops, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic.write_file(path, json.dumps(record, indent=1) + "\n")
    except OSError:
        return flops, "measured f32 matmul (cache not writable)"
    return flops, f"measured f32 matmul, cached in {path}"


def peak_flops(
    devices: list[jax.Device] | None = None, cache_dir: str | Path | None = None
) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together, and where the number comes from.

    CPU "devices" (including fake ones) share the same cores, so on CPU this is one measured
    matmul peak for the whole machine, cached under `cache_dir` (see cpu_peak).
    """
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return cpu_peak(Path(cache_dir).expanduser() if cache_dir else None)
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name] * len(devices), f"table: {name}"
    return float("nan"), f"unknown device kind {kind!r}"
