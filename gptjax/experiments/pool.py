"""Executing a sweep's runs: a local worker pool, or the one run a cluster task's --index picks.

Every run is `python -m gptjax train DIR/configs/<run>.yaml --no-progress` in its own process,
so each run directory DIR/<run> is a normal run directory and resuming is gptjax's own. Its
output goes to DIR/<run>/sweep.log. Locally, workers split this machine: on CPU each worker's
process is pinned to its share of the cores (sched_setaffinity; XLA sizes its thread pools from
it), with GPUs each worker gets one (CUDA_VISIBLE_DEVICES).

The child inherits the run's lock (runs.py), so a run stays marked as running as long as its
process lives, even if this one is killed. SIGTERM or Ctrl-C here is passed on as SIGTERM: every
run finishes its step, saves a checkpoint and exits; running the sweep again resumes them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from gptjax import atomic, distributed
from gptjax.experiments import runs as run_files
from gptjax.experiments.spec import Run, Sweep, SweepError
from gptjax.tools import launch

INTERRUPTED_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT}


def config_path(run: Run) -> Path:
    """The run's resolved config as the sweep hands it to `gptjax train`: DIR/configs/RUN.yaml
    (beside the run directories, so no process reads a file that training rewrites)."""
    return run.directory.parent / "configs" / f"{run.name}.yaml"


def write_config(run: Run) -> Path:
    """Write config_path(run) atomically (several processes of one run may write it at once)."""
    return atomic.write_file(config_path(run), run.config.to_yaml())


def train_argv(run: Run, overrides: list[str]) -> list[str]:
    path = config_path(run)
    return [sys.executable, "-m", "gptjax", "train", str(path), *overrides, "--no-progress"]


def select(sweep: Sweep, retry_failed: bool) -> tuple[list[Run], dict[str, int]]:
    """The runs to start now, and how many are left out by status."""
    chosen, skipped = [], {}
    for run in sweep.runs:
        status = run_files.read_state(run).status
        if status in ("pending", "interrupted") or (status == "failed" and retry_failed):
            chosen.append(run)
        else:
            skipped[status] = skipped.get(status, 0) + 1
    return chosen, skipped


def error_line(log: Path) -> str:
    """The line that says why a run failed: its `gptjax: error:` line, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "no output"
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("gptjax: error:")]
    return (errors or lines or ["no output"])[-1][:500]


def cpu_shares(workers: int) -> list[list[int]]:
    """This process's cores split into `workers` groups (contiguous; shared when too few)."""
    cores = sorted(os.sched_getaffinity(0))
    if workers >= len(cores):
        return [[cores[w % len(cores)]] for w in range(workers)]
    return [
        cores[w * len(cores) // workers : (w + 1) * len(cores) // workers] for w in range(workers)
    ]


def gpu_ids(env: dict[str, str]) -> list[str]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(launch.count_gpus(env))]


def reap(process: subprocess.Popen) -> tuple[int, float | None] | None:
    """(exit code, CPU seconds it used: user + system, all its threads) once the process has
    ended, else None. CPU seconds, unlike wall time, hardly change on a busy shared machine."""
    if process.returncode is not None:  # already collected (send_signal polls)
        return process.returncode, None
    try:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    except ChildProcessError:
        return process.wait(), None
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


class Pool:
    """Runs up to `workers` runs at once; returns 0 when every run it started finished."""

    def __init__(
        self,
        runs: list[Run],
        workers: int,
        overrides: list[str],
        progress: bool,
        pin: bool = True,
        lock: bool = True,
        command=train_argv,
    ):
        """`command(run, overrides)`: the argv that trains a run (tests pass stand-ins)."""
        self.queue = list(runs)
        self.command = command
        self.workers = workers
        self.overrides = overrides
        self.lock = lock
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.gpus: list[str] | None = None
        self.cores: list[list[int]] | None = None
        if launch.detect_platform(self.env) == "gpu":
            if pin:
                self.gpus = gpu_ids(self.env)
                if workers > len(self.gpus):
                    raise SweepError(
                        f"--workers {workers} needs a GPU each but {len(self.gpus)} are visible"
                    )
        elif pin and workers > 1:
            self.cores = cpu_shares(workers)
        self.active: dict[int, tuple[Run, subprocess.Popen, object, float]] = {}
        self.done = {"finished": 0, "interrupted": 0, "failed": 0, "skipped": 0}
        self.stopping = False
        total = sum(run.config.train.steps for run in self.queue)
        self.base = {run.name: run_files.read_state(run).checkpoint or 0 for run in self.queue}
        self.bar = None
        if progress:  # a bar on a terminal; elsewhere the runs' own lines say enough
            from gptjax import progress as progress_display

            self.bar = progress_display.bar(
                total=total, initial=sum(self.base.values()), unit="step", final=False
            )

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _start(self, slot: int, run: Run) -> bool:
        run.directory.mkdir(parents=True, exist_ok=True)
        handle = run_files.acquire(run.directory) if self.lock else None
        if self.lock and handle is None:
            self.say(f"skip {run.name}: another process is running it")
            self.done["skipped"] += 1
            return False
        write_config(run)
        env = dict(self.env)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        log = open(run.directory / run_files.LOG, "ab")  # noqa: SIM115
        fds = (handle.fileno(),) if handle is not None else ()
        process = subprocess.Popen(
            self.command(run, self.overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # signals come from this process only
            pass_fds=fds,  # the child shares the lock: it stays held while the run lives
        )
        log.close()
        if self.cores is not None:
            os.sched_setaffinity(process.pid, self.cores[slot])  # before XLA sizes its threads
        self.active[slot] = (run, process, handle, time.time())
        where = f" on GPU {self.gpus[slot]}" if self.gpus is not None else ""
        self.say(f"start {run.name} [{run.index}] {run.label}{where}")
        return True

    def _finish(self, slot: int, returncode: int, cpu_seconds: float | None) -> None:
        run, _, handle, started = self.active.pop(slot)
        error = None
        if returncode > 0 and returncode not in INTERRUPTED_CODES:
            error = error_line(run.directory / run_files.LOG)
        run_files.record_attempt(run.directory, started, returncode, error, cpu_seconds)
        run_files.release(handle)
        state = run_files.read_state(run)
        seconds = time.time() - started
        if error:
            self.done["failed"] += 1
            self.say(f"failed {run.name} after {seconds:.0f} s: {error}")
        elif state.status == "finished":
            self.done["finished"] += 1
            self.say(
                f"finished {run.name} in {seconds:.0f} s: eval loss {state.eval_loss:.4f}, "
                f"bpb {state.eval_bpb:.4f}"
            )
        else:
            self.done["interrupted"] += 1
            where = f"at step {state.checkpoint}" if state.checkpoint else "before a checkpoint"
            self.say(f"stopped {run.name} {where}; run the sweep again to resume it")

    def _signal(self, signum, frame) -> None:
        if not self.stopping:
            self.say(f"{signal.Signals(signum).name}: stopping every run at its next step")
        self.stopping = True
        for _, process, _, _ in self.active.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    def _progress(self) -> None:
        if self.bar is None:
            return
        running = sum(
            max(run_files.last_step(run.directory) - self.base[run.name], 0)
            for run, *_ in self.active.values()
        )
        position = self.finished_steps + running + sum(self.base.values())
        self.bar.update(position - self.bar.n)
        self.bar.set_postfix_str(
            f"{self.done['finished']} finished, {len(self.active)} running, "
            f"{len(self.queue)} queued, {self.done['failed']} failed"
        )

    def run(self) -> int:
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.finished_steps = 0
        try:
            while self.active or (self.queue and not self.stopping):
                free = [s for s in range(self.workers) if s not in self.active]
                while free and self.queue and not self.stopping:
                    if self._start(free[0], self.queue.pop(0)):
                        free.pop(0)
                for slot, (run, process, _, _) in list(self.active.items()):
                    ended = reap(process)
                    if ended is not None:
                        self.finished_steps += run.config.train.steps - self.base[run.name]
                        self._finish(slot, *ended)
                self._progress()
                time.sleep(0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self.bar.close()
        return 1 if self.done["failed"] else 0


def prepare_data(runs: list[Run]) -> None:
    """Prepare each distinct data set once, before several workers would race to build it."""
    seen = set()
    for run in runs:
        cfg = run.config
        key = json.dumps([cfg.data.model_dump(), cfg.model.seq_len, cfg.model.vocab_size])
        if key in seen:
            continue
        seen.add(key)
        argv = [sys.executable, "-m", "gptjax", "data", "prepare", str(write_config(run))]
        done = subprocess.run([*argv, "--no-progress"], capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            raise SweepError(f"preparing the data of {run.name} failed: {lines[-1]}")


def run_sweep(
    sweep: Sweep,
    workers: int,
    overrides: list[str],
    progress: bool,
    retry_failed: bool = False,
) -> int:
    """Start every run that is not finished, running or failed, `workers` at a time."""
    if workers < 1:
        raise SweepError("--workers must be >= 1")
    chosen, skipped = select(sweep, retry_failed)
    left = ", ".join(f"{n} {status}" for status, n in skipped.items())
    print(
        f"sweep {sweep.directory}: {len(chosen)} of {len(sweep.runs)} runs to run"
        + (f" ({left} left alone)" if left else ""),
        file=sys.stderr,
    )
    if skipped.get("failed"):
        print("gptjax: failed runs are left alone; --retry-failed runs them again", file=sys.stderr)
    if not chosen:
        return 0
    if workers > 1:
        prepare_data(chosen)
    return Pool(chosen, min(workers, len(chosen)), overrides, progress).run()


def run_index(
    sweep: Sweep,
    index: int,
    overrides: list[str],
    retry_failed: bool = False,
    expect: str | None = None,
    dry_run: bool = False,
) -> int:
    """The run a cluster task's index picks (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX).

    Each of the run's processes (one per host under srun) calls this; they resolve the same
    run, start `gptjax train` with the environment they were given (so a run on several hosts
    joins up as any gptjax run does), and process 0 alone keeps the lock and the attempt log."""
    if expect is not None and expect != sweep.digest:
        raise SweepError(
            f"{sweep.path} now expands to other runs than when the job was written "
            f"(plan {sweep.digest}, job {expect}); write the job again with `gptjax sweep emit`"
        )
    if not 0 <= index < len(sweep.runs):
        raise SweepError(f"--index {index} is outside 0..{len(sweep.runs) - 1} ({sweep.path})")
    run = sweep.runs[index]
    status = run_files.read_state(run).status
    print(f"sweep {sweep.directory}: [{index}] {run.name} {run.label}: {status}", file=sys.stderr)
    if dry_run:
        print(f"{run.name} {shlex.join(train_argv(run, overrides))}")
        return 0
    if status == "finished" or (status == "failed" and not retry_failed):
        return 0 if status == "finished" else 1
    topology = distributed.resolve()
    if topology.process_id != 0:  # another host of a multi-host run: train, output to stdout
        write_config(run)
        return subprocess.run(train_argv(run, overrides)).returncode
    # Process 0 logs to the run's sweep.log and records the attempt. With several processes
    # nothing is locked (they all run it; the scheduler runs each index once).
    lock = topology.num_processes == 1
    return Pool([run], 1, overrides, progress=False, pin=False, lock=lock).run()
