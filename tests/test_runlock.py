"""One writer per run directory (gptjax/training/runlock.py): a second `train` is refused with one
line naming the holder while the first goes on untouched; readers still read the run; the lock of a
dead process is taken over; with several processes all of them stop together."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli, run_processes, tiny_config

from gptjax.training import loop, runlock
from gptjax.training.runlock import RunLockError

HOST = socket.gethostname()
CONFIG = str(ROOT / "configs" / "debug.yaml")


def lock_of(run_dir) -> dict:
    return json.loads((run_dir / runlock.LOCK_NAME).read_text())


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def refusal(run_dir, holder: dict) -> str:
    return (
        f"{run_dir} is in use by another gptjax train (host {holder['host']}, pid "
        f"{holder['pid']}, since {holder['since']}); wait for it to end or use another run_dir"
    )


def test_a_held_lock_is_refused_with_the_holder_and_released(tmp_path):
    lock = runlock.acquire(tmp_path)
    held = lock_of(tmp_path)
    assert (held["host"], held["pid"]) == (HOST, os.getpid())
    with pytest.raises(RunLockError) as error:  # this process is alive: a second writer waits
        runlock.acquire(tmp_path)
    assert str(error.value) == refusal(tmp_path, held)
    lock.release()
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    runlock.acquire(tmp_path).release()


def write_lock(run_dir, **fields) -> dict:
    holder = {**runlock.identity(), "since": "earlier", **fields}
    (run_dir / runlock.LOCK_NAME).write_text(json.dumps(holder))
    return holder


def test_locks_of_dead_processes_are_taken_over(tmp_path, caplog):
    me = runlock.identity()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, and is not reaped yet
    deadline = time.monotonic() + 30
    while runlock._proc_stat(zombie.pid)[0] != "Z":
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.05)
    dead = [
        {"pid": dead_pid()},  # pid gone
        {"pid": zombie.pid, "start": runlock._start_time(zombie.pid)},  # a zombie
        {"start": me["start"] + 1},  # this pid, but another process (pid reused)
        {"boot": "another-boot-id"},  # the machine rebooted since
    ]
    for fields in dead:
        holder = write_lock(tmp_path, **fields)
        assert runlock.holder_is_dead(holder), fields
        with caplog.at_level(logging.WARNING, logger="gptjax"):
            lock = runlock.acquire(tmp_path)
        assert lock_of(tmp_path)["pid"] == os.getpid() and lock_of(tmp_path)["since"] != "earlier"
        assert f"of pid {holder['pid']} on {HOST}, which is no longer running" in caplog.text
        lock.release()
    zombie.wait()

    # A lock file left empty by a crash between creating and writing it: taken over once old.
    (tmp_path / runlock.LOCK_NAME).write_text("")
    old = time.time() - 2 * runlock.UNREADABLE_GRACE_S
    os.utime(tmp_path / runlock.LOCK_NAME, (old, old))
    runlock.acquire(tmp_path).release()


def test_a_lock_of_another_host_is_refused_naming_the_file(tmp_path):
    holder = write_lock(tmp_path, host="node-17", pid=dead_pid())
    assert not runlock.holder_is_dead(holder)  # cannot be checked from here
    with pytest.raises(RunLockError) as error:
        runlock.acquire(tmp_path)
    path = tmp_path / runlock.LOCK_NAME
    assert str(error.value) == refusal(tmp_path, holder) + f" (if that run is gone, delete {path})"
    assert lock_of(tmp_path) == holder  # untouched


KILLED_HOLDER = """
import sys, time
from gptjax.training import runlock
runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_train_takes_over_the_lock_of_a_killed_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        cfg = tiny_config(run, cache_dir, "train.steps=2", "train.eval_every=0")
        with pytest.raises(RunLockError, match=f"pid {holder.pid}, since"):
            loop.train(cfg, progress=False)
        assert not (run / "checkpoints").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    assert lock_of(run)["pid"] == holder.pid  # kill -9 left its lock behind
    assert loop.train(cfg, progress=False)["final_step"] == 2
    assert not (run / runlock.LOCK_NAME).exists()  # released at the end


def metric_steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_second_writer_is_refused_while_the_first_trains_on_and_readers_read(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"data.cache_dir={cache_dir}", "train.eval_every=0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "gptjax", "train", CONFIG, *args, "train.steps=1000000"]
        + ["train.log_every=1", "checkpoint.every=5", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "first.err").open("w"),
        cwd=ROOT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "5").is_dir():
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        held = lock_of(run)
        assert (held["host"], held["pid"]) == (HOST, first.pid)

        second = run_cli("train", CONFIG, *args, "train.steps=10", "--no-progress", timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == f"gptjax: error: {refusal(run, held)}"

        sample = run_cli("sample", str(run), "--prompt", "def ", "--max-new-tokens", "8")
        assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr
        evaluated = run_cli("eval", str(run), "--batches", "1")
        assert evaluated.returncode == 0 and "eval_loss" in evaluated.stdout, evaluated.stderr
        exported = run_cli("export", str(run), "--out", str(tmp_path / "export"))
        assert exported.returncode == 0, exported.stderr
        assert first.poll() is None  # the first run trained on through all of it
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # a clean stop: finish the step, save, exit 0
        try:
            code = first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
            raise
    assert code == 0, (tmp_path / "first.err").read_text()[-2000:]
    stopped = json.loads(first.stdout.read().strip().splitlines()[-1])["final_step"]
    assert metric_steps(run) == list(range(1, stopped + 1))  # every step once: nobody else wrote
    assert (run / "checkpoints" / str(stopped)).is_dir()
    assert not (run / runlock.LOCK_NAME).exists()


@pytest.mark.multiprocess
def test_with_two_processes_both_stop_when_the_run_is_held(tmp_path, cache_dir):
    """Only process 0 takes the lock; process 1 learns of the refusal and stops with it (no
    process is left waiting in a collective)."""
    run = tmp_path / "run"
    run.mkdir()
    lock = runlock.acquire(run)  # held by this (live) test process
    held = lock_of(run)
    args = ["train", CONFIG, f"run_dir={run}", f"data.cache_dir={cache_dir}"]
    args += ["distributed.heartbeat_timeout=10", "--no-progress"]
    try:
        results = run_processes([args, args], timeout=180)
    finally:
        lock.release()
    for code, err in results:
        assert code == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == f"gptjax: error: {refusal(run, held)}"
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written
