"""What a sweep's run directory says about its run: status, progress and its row of results.

A run directory is a normal gptjax run_dir (config.yaml, metrics.jsonl, checkpoints/) plus two
files the sweep keeps beside them:

    sweep.lock     held (flock) by the process running the run; released when that process dies
    sweep.jsonl    one line per attempt: {"host", "started", "seconds", "cpu_seconds",
                   "returncode", "error"}
    held_out.json  (spec `score: held_out`) the finished run scored on the whole held-out set:
                   {"eval_loss", "eval_ppl", "eval_bpb", "eval_tokens"}

Status, from the disk alone (so any process, on any host, can read it):

    finished     the final evaluation (step == train.steps) is in metrics.jsonl and the
                 checkpoint of that step exists
    running      a process holds sweep.lock, or `gptjax train` holds the run's train.lock
                 (gptjax/training/runlock.py) and is alive (or on another host, where it cannot be
                 checked)
    failed       the last attempt exited non-zero; its error line is kept
    interrupted  it has trained (metrics or a checkpoint) but is not finished: a rerun resumes it
    pending      nothing yet
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptjax import atomic
from gptjax.experiments.spec import Run, run_numbers
from gptjax.training import runlock

STATUSES = ("finished", "running", "interrupted", "failed", "pending")
LOCK = "sweep.lock"
ATTEMPTS = "sweep.jsonl"
LOG = "sweep.log"
HELD_OUT = "held_out.json"


@dataclass
class RunState:
    status: str
    step: int  # the newest step it reached (metrics or checkpoint)
    checkpoint: int | None  # the newest complete checkpoint
    eval_loss: float | None  # the run's score (None unless finished; with `score: held_out`,
    eval_bpb: float | None  # None until the held-out score is written)
    train_seconds: float | None  # training time from the logged tokens/s (no compile, no eval)
    wall_seconds: float  # all attempts, start to exit
    cpu_seconds: float | None  # all attempts: CPU time of the training processes (all threads)
    error: str | None  # the last attempt's error line, if it failed
    tasks: dict[str, float] = field(default_factory=dict)  # train.eval_tasks: eval/TASK/METRIC


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` (none if missing); a torn or broken line is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Complete checkpoints (Orbax renames a step's directory to its number once written)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def is_locked(run_dir: Path) -> bool:
    """Whether another process holds the run's lock (i.e. is running it now)."""
    path = run_dir / LOCK
    if not path.is_file():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            return error.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def trained_by(run_dir: Path) -> str | None:
    """`host:pid` of a live `gptjax train` holding the run's train.lock (or of one on another
    host, which cannot be checked from here); None when free or its holder is dead."""
    try:
        holder = json.loads((run_dir / runlock.LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return "?"  # being written this moment
    if not isinstance(holder, dict) or runlock.holder_is_dead(holder):
        return None
    return f"{holder.get('host')}:{holder.get('pid')}"


def acquire(run_dir: Path):
    """Take the run's lock; returns the open file holding it, or None if another process has it.

    A filesystem without flock (some network mounts) runs without the lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a")  # noqa: SIM115 (held until release)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            handle.close()
            return None
    return handle


def release(handle) -> None:
    if handle is not None:
        handle.close()  # closing the file drops the flock


def record_attempt(
    run_dir: Path,
    started: float,
    returncode: int,
    error: str | None,
    cpu_seconds: float | None = None,
) -> None:
    line = {
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 3),
        "returncode": returncode,
        "error": error,
    }
    with open(run_dir / ATTEMPTS, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def train_seconds(records: list[dict[str, Any]], tokens_per_step: int, log_every: int) -> float:
    """Training time from the logged throughput: each tokens/s line covers the steps since the
    previous one (log_every after a resume repeats steps)."""
    total, previous = 0.0, 0
    for record in records:
        if not record.get("tokens_per_s"):
            continue
        steps = record["step"] - previous
        steps = steps if steps > 0 else log_every
        total += steps * tokens_per_step / record["tokens_per_s"]
        previous = record["step"]
    return total


def _total(values) -> float | None:
    """The sum of the known values (None when none is known)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def held_out_score(run: Run) -> dict[str, Any] | None:
    """The finished run's held-out score, if one was written (train.steps is part of the run's
    name, so the final checkpoint it scored is the run's only final checkpoint)."""
    try:
        score = json.loads((run.directory / HELD_OUT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return score if isinstance(score, dict) else None


def score_held_out(run: Run) -> dict[str, Any]:
    """Score the finished run's final checkpoint on the whole held-out set; kept in
    held_out.json (written whole: a reader never sees half of it)."""
    from gptjax.training import runs as run_dirs  # jax and the model: only when a score is needed

    score = run_dirs.score_held_out(run.directory, run.config.train.steps)
    atomic.write_file(run.directory / HELD_OUT, json.dumps(score) + "\n")
    return score


def read_state(run: Run, score: str = "final") -> RunState:
    """The run's state from its directory; `score` (final | held_out) picks its eval numbers."""
    cfg, run_dir = run.config, run.directory
    records = read_jsonl(run_dir / "metrics.jsonl")
    checkpoints = checkpoint_steps(run_dir)
    attempts = read_jsonl(run_dir / ATTEMPTS)
    final = [
        r for r in records if r.get("step") == cfg.train.steps and r.get("eval_loss") is not None
    ]
    done = bool(final) and cfg.train.steps in checkpoints
    step = max([r.get("step", 0) for r in records] + checkpoints + [0])
    error = attempts[-1].get("error") if attempts and attempts[-1].get("returncode") else None
    if done:
        status = "finished"
    elif is_locked(run_dir) or trained_by(run_dir):
        status = "running"
    elif error:
        status = "failed"
    elif records or checkpoints:
        status = "interrupted"
    else:
        status = "pending"
    evaluation = final[-1] if done else {}
    if done and score == "held_out":
        evaluation = held_out_score(run) or {}
    seconds = None
    if records:
        tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        seconds = train_seconds(records, tokens_per_step, cfg.train.log_every)
    return RunState(
        status=status,
        step=step,
        checkpoint=checkpoints[-1] if checkpoints else None,
        eval_loss=evaluation.get("eval_loss"),
        eval_bpb=evaluation.get("eval_bpb"),
        train_seconds=seconds,
        wall_seconds=sum(a.get("seconds") or 0.0 for a in attempts),
        cpu_seconds=_total(a.get("cpu_seconds") for a in attempts),
        error=error if status == "failed" else None,
        tasks={k: v for k, v in (final[-1] if done else {}).items() if k.startswith("eval/")},
    )


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (cheap enough to poll: reads the file's tail)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            tail = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return 0


RESULT_COLUMNS = (
    "run",
    "params",
    "non_embedding_params",
    "tokens",
    "flops",
    "eval_loss",
    "eval_bpb",
    "status",
    "budget",
    "steps",
    "step",
    "train_seconds",
    "wall_seconds",
    "cpu_seconds",
    "label",
)


def result_row(run: Run, state: RunState) -> dict[str, Any]:
    """The run's row of results.csv (eval columns only for a finished run)."""
    numbers = run_numbers(run.config)
    return {
        "run": run.name,
        "params": numbers["params"],
        "non_embedding_params": numbers["non_embedding_params"],
        "tokens": numbers["tokens"],
        "flops": numbers["flops"],
        "eval_loss": state.eval_loss,
        "eval_bpb": state.eval_bpb,
        "status": state.status,
        "budget": run.budget,
        "steps": numbers["steps"],
        "step": state.step,
        "train_seconds": None if state.train_seconds is None else round(state.train_seconds, 1),
        "wall_seconds": round(state.wall_seconds, 1),
        "cpu_seconds": None if state.cpu_seconds is None else round(state.cpu_seconds, 1),
        "label": run.label,
        **state.tasks,
    }
