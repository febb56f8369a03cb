"""The metrics sinks: metrics.jsonl, TensorBoard and the progress (process 0): a bar on a
terminal, a plain line every N steps anywhere else (a log file gets no carriage returns)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from gptjax import progress as progress_display

PLAIN_LINES = 50  # off a terminal: about this many progress lines a run at most


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
        self.plain_every = 0  # off a terminal: a plain line every this many steps
        if progress and progress_display.interactive():
            self.bar = progress_display.bar(total=total_steps, initial=start_step, unit="step")
        elif progress:
            lines = math.ceil(total_steps / (PLAIN_LINES * log_every)) if total_steps else 1
            self.plain_every = log_every * max(1, lines)
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
            if self.plain_every and (step % self.plain_every == 0 or step == self.total_steps):
                line = f"step {step:,}/{self.total_steps:,}: loss {record['loss']:.3f}"
                if "tokens_per_s" in record:
                    line += f", {record['tokens_per_s']:,.0f} tokens/s"
                self.say(line)
        self.last.update(record)

    def eval(self, step: int, result: dict[str, float]) -> None:
        self.writer.write({"step": step, **result})
        self.last.update(result)
        tasks = "".join(
            f", {key[len('eval/') :]} {value:.4f}"
            for key, value in result.items()
            if key.startswith("eval/") and key.endswith(("/acc", "/acc_norm"))
        )
        line = f"step {step}: eval loss {result['eval_loss']:.4f}, bpb {result['eval_bpb']:.4f}"
        if "eval_pref_acc" in result:  # train.objective=dpo | reward: the held-out pairs
            line += f", pair accuracy {result['eval_pref_acc']:.4f}"
            line += f", margin {result['eval_pref_margin']:.4f}"
        self.say(line + tasks)
        self.restart_window()

    def say(self, message: str) -> None:
        """A line for the user (above the progress bar), process 0 only."""
        if not self.writer.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
