"""One writer per run directory: `gptjax train` holds RUN_DIR/train.lock while it runs.

The lock file names its holder as JSON {"host", "pid", "boot", "start", "since"} and is created
atomically (O_EXCL). A second `train` on the same run directory is refused with one line naming
the holder while that holder lives. A lock whose holder is dead is taken over: on the same host
(same hostname) the holder is dead when its pid is gone or a zombie, when the pid now belongs to
another process (its start time differs), or when the machine rebooted since (the boot id
differs). A lock of another host cannot be checked from here: it is refused, and the message
says which file to delete if that run is gone.

Readers (`sample`, `eval`, `export`) never take the lock: they open checkpoints read-only and
work while the run trains.

Several processes: process 0 alone takes the lock, and every process learns the outcome (an
all-gather) before anything is written, so all of them stop together with the same line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from gptjax.errors import UserError

LOCK_NAME = "train.lock"
UNREADABLE_GRACE_S = 5.0  # a lock file still empty after this long was left by a crash
log = logging.getLogger("gptjax")


class RunLockError(UserError):
    """The run directory is in use by another writer; the message is one line."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first); None if unavailable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), which tells a reused pid."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def identity() -> dict:
    """Who this process is, as written into the lock."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot": _boot_id(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def holder_is_dead(holder: dict) -> bool:
    """True when the holder surely no longer runs; False when it runs or cannot be checked
    (another host)."""
    if holder.get("host") != socket.gethostname():
        return False
    boot = _boot_id()
    if holder.get("boot") and boot and holder["boot"] != boot:
        return True  # rebooted since
    pid = int(holder.get("pid", 0))
    if pid <= 0:
        return True
    if Path("/proc/self/stat").exists():  # Linux: zombies and reused pids are told apart
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return True
        start = holder.get("start")
        return start is not None and len(fields) > 19 and int(fields[19]) != start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe(path: Path, holder: dict) -> str:
    """The refusal: one line naming the holder and what to do."""
    run_dir = path.parent
    who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    if holder.get("since"):
        who += f", since {holder['since']}"
    line = f"{run_dir} is in use by another gptjax train ({who}); wait for it to end or use "
    line += "another run_dir"
    if holder.get("host") != socket.gethostname():
        line += f" (if that run is gone, delete {path})"
    return line


def _read(path: Path) -> tuple[str, dict | None]:
    """(raw text, holder) of a lock file; holder None when it is empty or not a lock's JSON;
    raises FileNotFoundError when it is gone."""
    text = path.read_text()
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    return text, holder if isinstance(holder, dict) else None


def _take_over(path: Path, seen: str) -> None:
    """Remove the lock file whose text was `seen`, unless another process replaced it first."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it: try again
    if aside.read_text() == seen:
        aside.unlink()
        return
    try:  # a live lock taken over by a process that started at the same moment: put it back
        os.link(aside, path)
    except OSError:
        pass
    aside.unlink()


class Lock:
    """A held lock; `release()` removes the file if it still names this process."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def release(self) -> None:
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except FileNotFoundError:
            pass


def acquire(run_dir: str | Path) -> Lock:
    """Take RUN_DIR/train.lock (taking over a dead holder's); RunLockError when it is held."""
    path = Path(run_dir) / LOCK_NAME
    me = identity()
    text = json.dumps(me)
    deadline = time.monotonic() + 2 * UNREADABLE_GRACE_S
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            return Lock(path, text)
        try:
            seen, holder = _read(path)
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue  # released in between: try again
        if holder is None:  # being written right now, or left empty by a crash
            if age < UNREADABLE_GRACE_S and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            log.warning("taking over %s: it does not name a holder", path)
        elif holder_is_dead(holder):
            log.warning(
                "taking over %s of pid %s on %s, which is no longer running",
                path,
                holder.get("pid"),
                holder.get("host"),
            )
        else:
            raise RunLockError(describe(path, holder))
        _take_over(path, seen)


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[Lock | None]:
    """Hold the run directory's lock for the `with` block (process 0 holds it; every process
    raises the same RunLockError when it is taken)."""
    import jax

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(run_dir)
        except RunLockError as refused:
            error = str(refused)
    if jax.process_count() > 1:
        from gptjax import distributed

        if any(distributed.gather_ints(error is not None)) and error is None:
            path = Path(run_dir) / LOCK_NAME
            try:
                holder = _read(path)[1] or {}
            except OSError:  # not shared with process 0, or released since
                holder = {}
            error = describe(path, holder)
    if error is not None:
        raise RunLockError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
