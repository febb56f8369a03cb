"""FLOPs, MFU and the metrics sinks: metrics.jsonl, TensorBoard and the progress bar (process 0)."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

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


@functools.cache
def measured_cpu_peak(size: int = 1536, repeats: int = 5) -> float:
    """This machine's f32 matmul FLOP/s through XLA:CPU (all cores), measured once."""
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


def peak_flops(devices: list[jax.Device] | None = None) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together, and where the number comes from.

    CPU "devices" (including fake ones) share the same cores, so on CPU this is one measured
    matmul peak for the whole machine.
    """
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measured_cpu_peak(), "measured f32 matmul"
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
    late); every `log_every` steps it writes a line with the window's tokens/s and MFU.
    `restart_window()` leaves compilation, evaluation and checkpoints out of the throughput.
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
    ):
        self.writer = writer
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every = log_every
        self.total_steps = total_steps
        self.last: dict[str, Any] = {}
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.restart_window()

    def restart_window(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def dispatched(self) -> None:
        """One more step is on its way (advances the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, record: dict[str, Any]) -> None:
        self.window_steps += 1
        record = {"step": step, **record}
        if step % self.log_every == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self.window_start
            tokens_per_s = self.window_steps * self.tokens_per_step / elapsed
            record["tokens_per_s"] = tokens_per_s
            record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
            self.writer.write(record)
            self.restart_window()
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
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
