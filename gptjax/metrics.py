"""FLOPs, MFU and the metrics sinks: metrics.jsonl, TensorBoard and the progress bar (process 0)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import atomic
from gptjax.config import ModelConfig
from gptjax.model import param_counts  # counted from the model's own shapes

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


FLOPS_FORMULA = "6N + 12LHQT (PaLM appendix B; N without position embeddings)"


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6·N + 12·L·H·Q·T.

    N counts every parameter except position embeddings (the tied token table counts once, as
    the output projection); the attention term counts the full (unmasked) score matrix.
    """
    counts = param_counts(cfg)
    n = counts["params"] - counts["position_params"]
    T = seq_len or cfg.seq_len
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


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


class MetricsWriter:
    """Appends JSON lines to run_dir/metrics.jsonl and scalars to TensorBoard (process 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.file = None
        self.tensorboard = None
        if enabled:
            run_dir = Path(run_dir)
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            from tensorboardX import SummaryWriter  # lazy: only process 0 writes events

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


class StepLogger:
    """Turns each step's numbers into metrics lines, with tokens/s and MFU over a log window.

    `train(step, record)` is called once per step (after the step's numbers are read, one step
    late); every `log_every` steps it writes a line with the window's tokens/s and MFU. A window
    runs from one step's completion to another's and counts the steps between them: a step is
    taken to have completed when its numbers are read, or at the time given in `completed`
    (step -> perf_counter) by a loop that runs steps synchronously (debug mode), where reading
    happens a step later. `restart_window()` leaves compilation, evaluation and checkpoints out
    of the throughput: the window restarts at the last step known to be complete.
    """

    def __init__(
        self,
        writer: MetricsWriter,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        log_every: int,
        total_steps: int,
        start_step: int,
        progress: bool,
        completed: dict[int, float] | None = None,
    ):
        self.writer = writer
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every = log_every
        self.total_steps = total_steps
        self.completed = {} if completed is None else completed
        self.read = start_step  # the last step whose numbers were read
        self.last: dict[str, Any] = {}
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.restart_window()

    def restart_window(self) -> None:
        self.window = (max([self.read, *self.completed]), time.perf_counter())  # (step, time)

    def dispatched(self) -> None:
        """One more step is on its way (advances the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, record: dict[str, Any]) -> None:
        self.read = max(self.read, step)
        record = {"step": step, **record}
        if step % self.log_every == 0 or step == self.total_steps:
            end = self.completed.get(step, time.perf_counter())
            first, start = self.window
            if step > first and end > start:  # else no step completed inside the window
                tokens_per_s = (step - first) * self.tokens_per_step / (end - start)
                record["tokens_per_s"] = tokens_per_s
                record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
                self.window = (step, end)
            self.writer.write(record)
            for done in [s for s in self.completed if s <= step]:
                del self.completed[done]
            if self.bar is not None and "tokens_per_s" in record:
                tok_s = f"{record['tokens_per_s']:,.0f}"
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=tok_s)
        self.last.update(record)

    def eval(self, step: int, result: dict[str, float]) -> None:
        self.writer.write({"step": step, **result})
        self.last.update(result)
        self.say(f"step {step}: eval loss {result['eval_loss']:.4f}, bpb {result['eval_bpb']:.4f}")
        self.restart_window()

    def say(self, message: str) -> None:
        """A line for the user (above the progress bar), process 0 only."""
        if not self.writer.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
