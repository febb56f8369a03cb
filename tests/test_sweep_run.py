"""Running a sweep: statuses from the disk, the worker pool, resuming, cluster jobs
(gptjax/experiments/runs.py, pool.py, emit.py)."""

import csv
import json
import os
import socket
import subprocess
import sys

import jax
import pytest
import yaml
from conftest import ROOT, run_cli

from gptjax.core import steps
from gptjax.experiments import emit, pool, runs, spec
from gptjax.training import runlock
from gptjax.training import runs as run_dirs

DEBUG = str(ROOT / "configs" / "debug.yaml")


def write_spec(tmp_path, cache_dir, grid=None, name="s.yaml"):
    body = {
        "base": DEBUG,
        "dir": str(tmp_path / "sweep"),
        "overrides": {
            "data.cache_dir": str(cache_dir),
            "train.steps": 6,
            "train.eval_every": 0,
            "train.eval_steps": 1,
            "train.log_every": 3,
            "checkpoint.every": 3,
        },
        "grid": grid or {"model.d_model": [32, 64], "optim.lr": [1.0e-3, 3.0e-3]},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def fake_finish(run):
    """What a finished run leaves: the final evaluation and the final checkpoint."""
    steps = run.config.train.steps
    (run.directory / "checkpoints" / str(steps)).mkdir(parents=True)
    line = {"step": steps, "eval_loss": 2.0, "eval_bpb": 1.5}
    (run.directory / "metrics.jsonl").write_text(json.dumps(line) + "\n")


def python_command(code):
    return lambda run, overrides: [sys.executable, "-c", code, str(run.directory)]


def test_status_from_the_disk(tmp_path, cache_dir):
    sweep = spec.load(write_spec(tmp_path, cache_dir))
    finished, interrupted, failed, pending = sweep.runs
    fake_finish(finished)
    (interrupted.directory / "checkpoints" / "3").mkdir(parents=True)
    (interrupted.directory / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # half-written
    failed.directory.mkdir(parents=True)
    runs.record_attempt(failed.directory, 0.0, 2, "gptjax: error: boom")
    states = [runs.read_state(r) for r in sweep.runs]
    assert [s.status for s in states] == ["finished", "interrupted", "failed", "pending"]
    assert states[0].eval_bpb == 1.5
    assert states[1].checkpoint == 3 and states[1].eval_loss is None
    assert states[2].error == "gptjax: error: boom"
    # a later successful attempt clears the failure
    runs.record_attempt(failed.directory, 0.0, 0, None)
    assert runs.read_state(failed).status == "pending"


def test_a_live_train_lock_means_running(tmp_path, cache_dir):
    sweep = spec.load(write_spec(tmp_path, cache_dir))
    run = sweep.runs[0]
    run.directory.mkdir(parents=True)
    lock = run.directory / runlock.LOCK_NAME
    lock.write_text(json.dumps(runlock.identity()))  # held by this (live) process
    assert runs.read_state(run).status == "running"
    assert runs.trained_by(run.directory) == f"{socket.gethostname()}:{os.getpid()}"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    lock.write_text(json.dumps(runlock.identity() | {"pid": int(gone.stdout)}))
    assert runs.read_state(run).status == "pending"  # its holder is dead


def test_lock_is_held_while_the_child_lives(tmp_path):
    handle = runs.acquire(tmp_path)
    assert handle is not None and runs.is_locked(tmp_path)
    assert runs.acquire(tmp_path) is None  # a second sweep process leaves the run alone
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(handle.fileno(),),
    )
    runs.release(handle)  # as if the sweep process died: the child still holds the lock
    assert runs.is_locked(tmp_path)
    child.communicate(b"")
    assert not runs.is_locked(tmp_path)


def test_pool_records_failures_and_goes_on(tmp_path, cache_dir):
    sweep = spec.load(write_spec(tmp_path, cache_dir))
    finish, fail, killed, last = sweep.runs
    code = (
        "import json, os, signal, sys; d = sys.argv[1]; name = os.path.basename(d)\n"
        f"if name == {fail.name!r}:\n"
        "    print('some output'); print('gptjax: error: boom', file=sys.stderr)\n"
        "    print('traceback tail'); sys.exit(2)\n"
        f"if name == {killed.name!r}:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.makedirs(os.path.join(d, 'checkpoints', '6'))\n"
        "open(os.path.join(d, 'metrics.jsonl'), 'w').write("
        "json.dumps({'step': 6, 'eval_loss': 2.0, 'eval_bpb': 1.5}) + '\\n')\n"
    )
    rc = pool.Pool(list(sweep.runs), 2, [], progress=False, command=python_command(code)).run()
    assert rc == 1  # one run failed
    statuses = [runs.read_state(r).status for r in sweep.runs]
    assert statuses == ["finished", "failed", "pending", "finished"]  # killed before any step
    assert runs.read_state(fail).error == "gptjax: error: boom"
    attempts = runs.read_jsonl(killed.directory / runs.ATTEMPTS)
    assert attempts[-1]["returncode"] == -9 and attempts[-1]["error"] is None
    assert all(runs.read_jsonl(r.directory / runs.ATTEMPTS)[-1]["cpu_seconds"] > 0
               for r in sweep.runs)  # fmt: skip
    assert not any(runs.is_locked(r.directory) for r in sweep.runs)
    assert [r.name for r in pool.select(sweep, retry_failed=False)[0]] == [killed.name]
    chosen, skipped = pool.select(sweep, retry_failed=True)
    assert [r.name for r in chosen] == [fail.name, killed.name]
    assert skipped == {"finished": 2}


def test_cpu_shares_split_the_cores():
    cores = sorted(os.sched_getaffinity(0))
    shares = pool.cpu_shares(len(cores))
    assert sorted(c for share in shares for c in share) == cores
    assert all(len(share) == 1 for share in shares)
    assert pool.cpu_shares(1) == [cores]


def test_slurm_array_maps_each_index_to_its_run(tmp_path, cache_dir):
    path = write_spec(tmp_path, cache_dir)
    sweep = spec.load(path)
    script = tmp_path / "sweep.sbatch"
    script.write_text(emit.slurm(sweep, str(path), gpus_per_node=8))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    # Fake srun (drops its options, adds --dry-run) and python (this interpreter).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@" --dry-run\n'
    )
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in ("srun", "python"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GPTJAX_VENV": str(tmp_path / "no-venv"),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "PYTHONPATH": str(ROOT),
    }
    for run in sweep.runs:
        done = subprocess.run(
            ["bash", str(script)],
            env=env | {"SLURM_ARRAY_TASK_ID": str(run.index)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        name, command = done.stdout.split(" ", 1)
        assert name == run.name
        assert command.split()[-2:] == [str(pool.config_path(run)), "--no-progress"]
    # The spec changed after the job was written: the task refuses instead of running another run
    write_spec(tmp_path, cache_dir, grid={"model.d_model": [32, 48, 64]})
    done = subprocess.run(
        ["bash", str(script)], env=env | {"SLURM_ARRAY_TASK_ID": "0"}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "expands to other runs than when the job was written" in done.stderr


def test_kubernetes_indexed_job(tmp_path, cache_dir):
    path = write_spec(tmp_path, cache_dir)
    sweep = spec.load(path)
    job = yaml.safe_load(emit.kubernetes(sweep, str(path), gpus=1, parallel=2))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 4 and job["spec"]["parallelism"] == 2
    [container] = job["spec"]["template"]["spec"]["containers"]
    command = container["command"][-1]
    assert f'--index "$JOB_COMPLETION_INDEX" --plan {sweep.digest}' in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def snapshot(run_dir):
    """Every file under run_dir with its size and modification time."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), run_dir)] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sweep_interrupted_then_rerun_loses_nothing(tmp_path, cache_dir):
    path = write_spec(tmp_path, cache_dir)
    sweep = spec.load(path)
    first, second, third, fourth = sweep.runs
    # Two cluster-style tasks at once: run 0 to the end, run 2 stopped after step 3 (as if
    # preempted: train.stop_at checkpoints and exits).
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "gptjax", "sweep", "run", str(path), "--index", str(index),
             *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index, extra in ((0, []), (2, ["train.stop_at=3"]))
    ]  # fmt: skip
    for task in tasks:
        _, err = task.communicate(timeout=600)
        assert task.returncode == 0, err
    states = [runs.read_state(run) for run in sweep.runs]
    assert [s.status for s in states] == ["finished", "pending", "interrupted", "pending"]
    assert states[2].checkpoint == 3
    before = snapshot(first.directory)

    done = run_cli("sweep", "run", str(path), "--workers", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "3 of 4 runs to run (1 finished left alone)" in done.stderr
    # the finished run was not touched
    assert snapshot(first.directory) == before
    # the interrupted run resumed from its checkpoint instead of starting over
    assert f"resumed {third.directory} at step 3" in (third.directory / "sweep.log").read_text()
    records = runs.read_jsonl(third.directory / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [3, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [6]
    assert len(runs.read_jsonl(third.directory / runs.ATTEMPTS)) == 2

    done = run_cli("sweep", "report", str(path), "--no-plots", "--bootstrap", "0")
    assert done.returncode == 0, done.stderr
    with open(sweep.directory / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == [r.name for r in sweep.runs]
    assert {r["status"] for r in rows} == {"finished"}
    for row, run in zip(rows, sweep.runs, strict=True):
        final = [r for r in runs.read_jsonl(run.directory / "metrics.jsonl") if "eval_bpb" in r]
        assert float(row["eval_bpb"]) == pytest.approx(final[-1]["eval_bpb"])
        assert int(row["tokens"]) == 6 * 8 * 64
    assert pool.select(sweep, retry_failed=True) == ([], {"finished": 4})  # nothing left to do

    # score: held_out rescores every finished run on the whole held-out set (the same text for
    # every run whatever its batch size), keeps it in held_out.json and reports that
    body = yaml.safe_load(path.read_text()) | {"score": "held_out"}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    sweep = spec.load(path)
    assert [r.name for r in sweep.runs] == [r["run"] for r in rows]  # the same runs
    done = run_cli("sweep", "report", str(path), "--no-plots", "--bootstrap", "0")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("on the whole held-out set") == 4
    with open(sweep.directory / "results.csv", newline="") as handle:
        held = list(csv.DictReader(handle))
    for row, run in zip(held, sweep.runs, strict=True):
        score = json.loads((run.directory / runs.HELD_OUT).read_text())
        assert float(row["eval_bpb"]) == pytest.approx(score["eval_bpb"])
        assert score["eval_tokens"] > 8 * 64  # more than the run's own one-batch evaluation
    # oracle: every held-out window once, whatever the batch size: the same checkpoint scored
    # in batches of another size (another last, partial batch) gives the same numbers
    setup, params, _ = run_dirs.load_run(first.directory)
    data = run_dirs.load_data(setup.cfg, first.directory)
    n = len(data.val)
    size = next(b for b in (11, 13, 7, 5) if n % b)  # ends in a partial batch
    train = setup.cfg.train.model_copy(update={"batch_size": size})
    other = steps.build(setup.cfg.model_copy(update={"train": train}), jax.devices()[:1])
    batches = -(-n // size)
    again = steps.evaluate(other, steps.make_eval_step(other, data.token_bytes), params, data,
                           batches, n)  # fmt: skip
    score = json.loads((first.directory / runs.HELD_OUT).read_text())
    assert score["eval_tokens"] == n * 64
    assert again["eval_bpb"] == pytest.approx(score["eval_bpb"], rel=1e-5)
    assert again["eval_loss"] == pytest.approx(score["eval_loss"], rel=1e-5)
    # oracle: scored on the first batch only, the checkpoint gives the run's own final eval
    one = json.loads(run_cli("eval", str(first.directory), "--batches", "1").stdout)
    final = [r for r in runs.read_jsonl(first.directory / "metrics.jsonl") if "eval_bpb" in r]
    assert one["eval_bpb"] == pytest.approx(final[-1]["eval_bpb"], rel=1e-5)
    # a second report reuses the scores; status shows them
    again = run_cli("sweep", "report", str(path), "--no-plots", "--bootstrap", "0")
    assert again.returncode == 0 and "held-out set" not in again.stderr
    status = run_cli("sweep", "status", str(path)).stdout
    assert f"{float(held[0]['eval_bpb']):.4f}" in status and "whole held-out set" in status
