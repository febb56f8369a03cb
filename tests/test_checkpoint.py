"""Checkpoints that survive anything (issue 5): other meshes and process counts, SIGTERM, kill -9
in the middle of a save, NaN steps, damaged checkpoint files, user mistakes, export.

The oracle is one uninterrupted 20-step run (configs/debug.yaml, f32, mesh (2,2,2)): a run that
is stopped and resumed on the same mesh must reproduce its losses exactly (the restored state is
bit-identical and the batch of a step depends only on the seed and the step); on another mesh
or process count only the order of f32 sums changes.
"""

import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli, slowed_train, tiny_config
from flax import nnx

from gptjax import cli
from gptjax.config import ConfigError
from gptjax.core import model, steps
from gptjax.data import pipeline
from gptjax.training import checkpoint, loop, runs

STEPS = 20
# train.eval_every=0: one evaluation at the very end (fewer compiles); log every step.
COMMON = ["train.log_every=1", "train.eval_every=0", "checkpoint.every=10", "checkpoint.keep=2"]
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
CONFIG = str(ROOT / "configs" / "debug.yaml")
# Mesh changes only reorder f32 sums (the loss is second-order in any one weight whose near-zero
# gradient flips sign with that order): tests/test_sharding.py measured <= 1.6e-7 relative loss
# difference over 5 steps and asserts rtol 1e-6. Resumed on three other layouts (8x1x1, one
# device, 2 processes x fsdp 4 x tensor 2), steps 11..20 differed by <= 9.3e-8 relative from the
# uninterrupted (2,2,2) run: the same tolerance holds.
RESUME_RTOL = 1e-6


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; the last line of a step wins (a run that died after its
    last checkpoint logged steps that the resumed run logs again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def step_dirs(run_dir: Path) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints").iterdir()), key=_natural)


def _natural(name: str):
    head = re.match(r"\d+", name)
    return (int(head[0]) if head else math.inf, name)


def train_in_process(run_dir, cache_dir, *overrides, steps=STEPS):
    cfg = tiny_config(run_dir, cache_dir, f"train.steps={steps}", *COMMON, *overrides)
    return loop.train(cfg, progress=False)


def start(run_dir, cache_dir, *overrides, log: Path, argv=None, env=None):
    """`gptjax train` (or `argv`) in the background; stdout and stderr go to files."""
    argv = argv or [sys.executable, "-m", "gptjax", "train", CONFIG]
    args = [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", f"train.steps={STEPS}"]
    return subprocess.Popen(
        [*argv, *args, *COMMON, *overrides, "--no-progress"],
        stdout=log.with_suffix(".out").open("w"),
        stderr=log.with_suffix(".err").open("w"),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float) -> int:
    """Wait; on timeout stop the process (SIGTERM first: a launcher then stops its children)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise


def wait_until(predicate, process: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {what}")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise AssertionError(f"timed out waiting for {what}")


def restore_all(run_dir: Path, cache_dir) -> dict[int, dict]:
    """Every listed step of run_dir, restored (read-only) onto 8 devices, on the host."""
    setup = steps.build(tiny_config(run_dir, cache_dir, "mesh.data=8"))
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    try:
        return {s: jax.device_get(ckpt.restore(setup.abstract_state, s)) for s in ckpt.all_steps()}
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run: (run_dir, losses of steps 1..20); checkpoints at 10 and 20."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_in_process(run_dir, cache_dir, *MESH_222)
    found = losses(run_dir)
    assert sorted(found) == list(range(1, STEPS + 1))
    assert found[STEPS] < found[1] - 0.5  # it learns, so equal losses mean something
    return run_dir, found


# --- resume anywhere --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_on_other_meshes_and_process_counts(reference, tmp_path, cache_dir):
    """Steps 1-10 on mesh (2,2,2), 11-13 on (8,1,1), 14-16 on one device, 17-20 on 2 processes
    x 4 devices (fsdp 4 x tensor 2): the losses of the uninterrupted run."""
    ref_dir, expected = reference
    run = tmp_path / "run"
    train_in_process(run, cache_dir, *MESH_222, "train.stop_at=10")
    assert step_dirs(run) == ["10"] and max(losses(run)) == 10
    train_in_process(run, cache_dir, "mesh.data=8", "train.stop_at=13")
    assert step_dirs(run) == ["10", "13"]

    one = run_cli(
        "train",
        CONFIG,
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        f"train.steps={STEPS}",
        *COMMON,
        "mesh.data=1",
        "train.stop_at=16",
        "--no-progress",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"gptjax: resumed {run} at step 13" in one.stderr
    assert "mesh.data: 8 -> 1" in one.stderr  # the allowed changes are listed
    assert json.loads(one.stdout.splitlines()[-1])["final_step"] == 16

    log = tmp_path / "launch"
    launcher = [sys.executable, "-m", "gptjax", "launch", "--nproc=2", "--devices-per-proc=4"]
    process = start(
        run,
        cache_dir,
        "mesh.data=1",
        "mesh.fsdp=4",
        "mesh.tensor=2",
        "distributed.init_timeout=120",
        log=log,
        argv=[*launcher, "--", "train", CONFIG],
    )
    code = finish(process, timeout=400)
    err = log.with_suffix(".err").read_text()
    assert code == 0, err[-3000:]
    assert f"[rank 0] gptjax: resumed {run} at step 16" in err
    assert f"[rank 1] gptjax: resumed {run} at step 16" not in err  # process 0 speaks

    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, 11)] == [expected[s] for s in range(1, 11)]  # same mesh
    resumed = np.array([got[s] for s in range(11, STEPS + 1)])
    oracle = np.array([expected[s] for s in range(11, STEPS + 1)])
    print("largest relative loss difference, steps 11-20:", np.max(np.abs(resumed / oracle - 1)))
    np.testing.assert_allclose(resumed, oracle, rtol=RESUME_RTOL)
    # Both processes wrote their shards of step 20; it restores (here on 8 devices).
    final = restore_all(run, cache_dir)
    assert sorted(final) == [16, 20] and int(final[20]["step"]) == STEPS


# --- stop signals and kill -9 -----------------------------------------------------------------


SLOW_DATA = slowed_train("gptjax.data.pipeline:Dataset", "train_rows")  # test-only


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes_exactly(reference, tmp_path, cache_dir):
    _, expected = reference
    run = tmp_path / "run"
    log = tmp_path / "train"
    argv = [sys.executable, "-c", SLOW_DATA, CONFIG]
    process = start(run, cache_dir, *MESH_222, "checkpoint.every=0", log=log, argv=argv)
    metrics = run / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(losses(run)) >= 3, process, 300, "step 3")
    # Freeze it, so the signal lands mid-run however fast the steps are; it is handled on SIGCONT.
    os.kill(process.pid, signal.SIGSTOP)
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    assert finish(process, timeout=120) == 0, log.with_suffix(".err").read_text()[-3000:]
    err = log.with_suffix(".err").read_text()
    assert "SIGTERM received: finishing the step and saving a checkpoint" in err
    stopped = int(re.search(r"gptjax: stopped at step (\d+); checkpoint saved", err)[1])
    assert 3 <= stopped < STEPS
    summary = json.loads(log.with_suffix(".out").read_text().splitlines()[-1])
    assert summary["final_step"] == stopped and summary["preempted"] is True
    assert step_dirs(run) == [str(stopped)]  # checkpoint.every=0: only the stop saved one
    assert max(losses(run)) == stopped  # every finished step was logged

    train_in_process(run, cache_dir, *MESH_222, "checkpoint.every=0")
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # same mesh: bit for bit


# Test-only: holds the save of step 10 just before Orbax's commit (the rename of its temporary
# directory), so that kill -9 lands in the middle of that asynchronous save.
SLOW_COMMIT = """
import sys, time
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def slow_commit(self):
    if self.get_final().name == "10":
        print("committing step 10", flush=True)
        time.sleep(600)
    await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
from gptjax.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_kill_9_during_an_async_save_restarts_from_the_previous_step(
    reference, tmp_path, cache_dir, capsys
):
    _, expected = reference
    run = tmp_path / "run"
    log = tmp_path / "train"
    overrides = [*MESH_222, "checkpoint.every=5", "checkpoint.keep_period=10"]
    argv = [sys.executable, "-c", SLOW_COMMIT, CONFIG]
    process = start(run, cache_dir, *overrides, log=log, argv=argv)
    out = log.with_suffix(".out")
    wait_until(lambda: "committing step 10" in out.read_text(), process, 300, "the save of 10")
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    left = step_dirs(run)
    assert left[0] == "5" and len(left) == 2 and left[1].startswith("10.orbax-checkpoint-tmp")
    assert (run / "checkpoints" / left[1] / "state").is_dir()  # all written, never committed
    assert max(losses(run)) > 10  # the run went on while step 10 was being saved

    capsys.readouterr()
    train_in_process(run, cache_dir, *overrides)
    assert f"gptjax: resumed {run} at step 5" in capsys.readouterr().err
    # The half-saved step is gone; keep 2 (15, 20) plus every step divisible by keep_period.
    assert step_dirs(run) == ["10", "15", "20"]
    got = losses(run)
    assert [got[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]


# --- non-finite steps -------------------------------------------------------------------------

POISONED = {3, 6, 7, 8}  # metrics steps (1-based) whose loss is made NaN


@pytest.mark.slow
def test_nan_steps_are_skipped_and_never_checkpointed(tmp_path, cache_dir, monkeypatch, capsys):
    """Step 3's loss is NaN: its update is skipped and training goes on; steps 6, 7, 8 too:
    with train.max_bad_steps=3 the run stops with one clear line. Every checkpoint is finite."""
    real_rows, real_losses = pipeline.Dataset.train_rows, steps.token_losses_and_aux

    def rows(self, seed, step, batch_size, start, stop):
        tokens = real_rows(self, seed, step, batch_size, start, stop)
        return np.zeros_like(tokens) if step + 1 in POISONED else tokens

    def token_losses_and_aux(graphdef, params, batch, key=None, segments=False):  # all-zero: NaN
        poison = jnp.where(jnp.all(batch["inputs"] == 0), jnp.nan, 0.0)
        losses, aux = real_losses(graphdef, params, batch, key, segments)
        return losses + poison, aux

    monkeypatch.setattr(pipeline.Dataset, "train_rows", rows)
    monkeypatch.setattr(steps, "token_losses_and_aux", token_losses_and_aux)
    run = tmp_path / "run"
    argv = ["train", CONFIG, f"run_dir={run}", f"data.cache_dir={cache_dir}", "--no-progress"]
    more = ["train.log_every=1", "checkpoint.every=1", "checkpoint.keep=30"]
    code = cli.main([*argv, *more, "train.max_bad_steps=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "gptjax: step 3: non-finite loss or gradient, update skipped" in err
    assert err.strip().splitlines()[-1] == (
        "gptjax: error: 3 steps in a row (to step 8) had a non-finite loss or gradient; "
        "stopping. The last checkpoint holds finite weights: lower optim.lr or check the data"
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert sorted(by_step) == list(range(1, 8))  # step 8 raised before it was logged
    assert [s for s, r in by_step.items() if not np.isfinite(r["loss"])] == [3, 6, 7]
    assert [by_step[s]["bad_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 1, 2, 3]

    saved = restore_all(run, cache_dir)
    assert sorted(saved) == list(range(1, 9))
    for step, state in saved.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            assert np.all(np.isfinite(leaf)), (step, jax.tree_util.keystr(path))

    def same(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return all(np.array_equal(x, y) for x, y in pairs)

    for step in range(1, 9):  # a skipped step leaves params and Adam state as they were
        untouched = same(saved[step]["params"], saved[step - 1]["params"]) if step > 1 else False
        assert untouched == (step in POISONED), step
        if step in POISONED:
            assert same(saved[step]["opt_state"], saved[step - 1]["opt_state"])
        assert int(saved[step]["step"]) == step  # the data still moves on


# --- damaged checkpoints and user mistakes ----------------------------------------------------


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_step(
    reference, tmp_path, cache_dir, caplog
):
    ref_dir, expected = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    os.truncate(largest_file(run / "checkpoints" / "20"), 1000)
    with caplog.at_level(logging.WARNING, logger="gptjax"):
        train_in_process(run, cache_dir, *MESH_222)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    where = re.escape(f"{run}/checkpoints")
    assert re.search(  # the step, the array and the file: TensorStore's own words
        rf"skipping checkpoint: cannot restore step 20 from {where}: .*Error reading "
        rf'"[\w.]+/[\d.]+" in OCDBT database at local file "{where}/20/state/".* size 1000',
        warnings[0],
    ), warnings
    assert warnings[1] == f"moved the unreadable checkpoint {run}/checkpoints/20 to 20.unreadable"
    # Step 20 was trained again from 10 (and saved again); the damaged copy is kept aside.
    assert step_dirs(run) == ["10", "20", "20.unreadable"]
    assert losses(run) == expected


def out_of_space_at(monkeypatch, step: int) -> None:
    """Every array write of checkpoint `step` fails with ENOSPC, in Orbax's background thread,
    where TensorStore's real "No space left on device" arises (the function Orbax hands each
    array to TensorStore with; private to Orbax, hence looked up here)."""
    from orbax.checkpoint._src.serialization import serialization

    original = serialization.async_serialize_from_host

    async def write(rslices, tspec, **kwargs):
        if f"/{step}.orbax-checkpoint-tmp" in str(tspec):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original(rslices, tspec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)


@pytest.mark.slow
@pytest.mark.parametrize(("full_at", "intact"), [(15, 10), (20, 15)], ids=["next-save", "last"])
def test_out_of_disk_during_a_save_stops_in_one_line_and_resumes_exactly(
    reference, tmp_path, cache_dir, monkeypatch, capsys, caplog, full_at, intact
):
    """Checkpoints every 5 steps; the save of `full_at` runs out of space (found when the next
    save waits for it, or by the final wait of the run). One line, exit 2; the complete steps are
    untouched, and the run resumes from `intact` with the uninterrupted run's losses (checked in
    the first case; the second ends the same way)."""
    _, expected = reference
    run = tmp_path / "run"
    argv = ["train", CONFIG, f"run_dir={run}", f"data.cache_dir={cache_dir}", *MESH_222]
    argv += [f"train.steps={STEPS}", *COMMON, "checkpoint.every=5", "--no-progress"]
    with monkeypatch.context() as patch:
        out_of_space_at(patch, full_at)
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"gptjax: error: saving checkpoint step {full_at} failed: no space left on device "
        f"({run}/checkpoints); the newest complete checkpoint, step {intact}, is intact: free "
        "space and run the same command to resume from it"
    )
    assert "Traceback" not in err
    assert not [r for r in caplog.records if "No space left" in str(r.exc_info)]  # no pages
    complete = [name for name in step_dirs(run) if name.isdigit()]
    assert complete == [str(intact - 5), str(intact)]  # keep=2, the failed step not among them
    assert not (run / "train.lock").exists()
    if full_at == STEPS:
        return  # resuming is the same as in the other case

    assert cli.main(argv) == 0  # space again: resumes from `intact`
    assert f"resumed {run} at step {intact}" in capsys.readouterr().err
    resumed = losses(run)
    assert [resumed[s] for s in range(intact + 1, STEPS + 1)] == [
        expected[s] for s in range(intact + 1, STEPS + 1)
    ]
    assert step_dirs(run) == ["15", "20"]  # the failed step's temporary directory is gone


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_step_one_process_cannot_read_is_skipped_by_all(tmp_path, cache_dir):
    """2 processes x 4 devices with the parameters split between them (fsdp 4 x tensor 2): each
    process reads only its own shards. Process 1's shards of step 4 are damaged, so process 1
    cannot restore it while process 0 can: both must resume from step 2 (not hang in a barrier,
    not train from different steps), set 4 aside, and retrain steps 3-4 exactly."""
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "gptjax", "launch", "--nproc=2", "--devices-per-proc=4"]
    argv = [*launcher, "--grace=2", "--", "train", CONFIG]
    overrides = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.steps=4"]
    overrides += ["checkpoint.every=2", "distributed.heartbeat_timeout=20"]
    first = start(run, cache_dir, *overrides, log=tmp_path / "first", argv=argv)
    assert finish(first, timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    expected = losses(run)
    assert sorted(expected) == [1, 2, 3, 4] and step_dirs(run) == ["2", "4"]
    shards = sorted((run / "checkpoints" / "4" / "state" / "ocdbt.process_1" / "d").iterdir())
    assert shards  # what process 1 wrote, and alone reads back on this mesh
    for shard in shards:
        os.truncate(shard, shard.stat().st_size // 2)

    second = start(run, cache_dir, *overrides, log=tmp_path / "second", argv=argv)
    code = finish(second, timeout=300)  # a hang fails here
    err = (tmp_path / "second.err").read_text()
    assert code == 0, err[-3000:]
    where = re.escape(f"{run}/checkpoints")
    assert re.search(  # process 1 names the array and the file it could not read ...
        rf"\[rank 1\] gptjax: WARNING: skipping checkpoint: cannot restore step 4 from {where}: "
        rf'.*Error reading "[\w.]+/[\d.]+" in OCDBT database',
        err,
    ), err[-3000:]
    # ... process 0, which read it, skips it too, and both resume from step 2.
    assert (
        f"[rank 0] gptjax: WARNING: skipping checkpoint: process 1 could not restore step 4 "
        f"from {run}/checkpoints"
    ) in err
    assert f"[rank 0] gptjax: resumed {run} at step 2" in err
    assert step_dirs(run) == ["2", "4", "4.unreadable"]
    assert losses(run) == expected  # steps 3 and 4 again, bit for bit (the same mesh)


def test_no_readable_checkpoint_is_one_clear_error(reference, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for step in ("10", "20"):
        os.truncate(largest_file(run / "checkpoints" / step), 1000)
    argv = ["train", CONFIG, f"run_dir={run}", f"data.cache_dir={cache_dir}", *MESH_222]
    assert cli.main([*argv, *COMMON, "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"gptjax: error: none of the checkpoints [10, 20] in {run}/checkpoints restores"
    assert step_dirs(run) == ["10", "20"]  # nothing moved or deleted


def test_inference_reads_the_parameters_alone(reference, tmp_path, cache_dir, capsys):
    """Step 30 holds step 20's parameters beside an optimiser state of another structure:
    training cannot restore it, but load_run (sample, eval, chat, serve, export) reads the
    parameters alone, so it loads them exactly and samples what step 20 samples, on a mesh
    (3 devices) that train.batch_size=8 does not divide."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    params = restore_all(run, cache_dir)[20]["params"]
    other = {"params": params, "opt_state": {"not_adamw": np.full(3, np.nan)}, "step": 30}
    writer = checkpoint.Checkpointer(run, async_save=False)
    writer.save(30, jax.device_put(other, jax.devices()[0]))
    writer.close()
    setup = steps.build(tiny_config(run, cache_dir))
    reader = checkpoint.Checkpointer(run, read_only=True)
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore step 30"):
        reader.restore(setup.abstract_state, 30)  # the training restore would need AdamW's
    reader.close()

    loaded, restored, _ = runs.load_run(run)
    assert not hasattr(loaded, "optimizer")
    want = runs.flatten(params)
    assert runs.flatten(restored).keys() == want.keys()
    for name, array in runs.flatten(restored).items():
        np.testing.assert_array_equal(array, want[name], err_msg=name)

    def sample(*flags):
        argv = ["sample", str(run), "--prompt", "def ", "--max-new-tokens", "12"]
        assert cli.main([*argv, "--temperature", "0", *flags]) == 0
        return capsys.readouterr().out

    capsys.readouterr()
    assert sample() == sample("--step", "20") == sample("--devices", "3")


def test_other_model_shapes_are_refused_listing_every_key(reference, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = tiny_config(run, cache_dir, "model.n_layer=3", "model.d_model=128", "model.n_head=4")
    with pytest.raises(ConfigError) as error:
        loop.train(cfg, progress=False)
    assert str(error.value) == (
        f"{run} holds a run with different parameter shapes: model.d_model (64 -> 128), "
        "model.n_head (2 -> 4), model.n_layer (2 -> 3) (blocks.fc_b [2, 256] -> [3, 512]; "
        "blocks.fc_w [2, 64, 256] -> [3, 128, 512]; blocks.ln1_bias [2, 64] -> [3, 128] "
        "and 13 more); use a new run_dir"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_unwritable_run_dir_is_one_clear_error(tmp_path, cache_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["train", CONFIG, f"data.cache_dir={cache_dir}", "--no-progress"]
    assert cli.main([*argv, f"run_dir={blocker}/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gptjax: error: run_dir {blocker}/run is not writable: Not a directory"
    assert blocker.read_text() == "not a directory"

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "notes.txt").write_text("mine")
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()  # as root, permissions do not stop writes
    except PermissionError:
        assert cli.main([*argv, f"run_dir={locked}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"gptjax: error: run_dir {locked} is not writable: Permission denied"
        assert sorted(p.name for p in locked.iterdir()) == ["notes.txt"]
    finally:
        locked.chmod(0o755)


# --- export -----------------------------------------------------------------------------------


def test_export_writes_the_checkpoint_parameters(reference, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    # An in-flight save of a run that is training right now: a reader must leave it alone.
    in_flight = run / "checkpoints" / "30.orbax-checkpoint-tmp-1234567"
    in_flight.mkdir()
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"exported": str(out)}
    assert in_flight.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "export.json",
        "params.npz",
        "tokenizer.model",
    ]
    assert (out / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()

    cfg = tiny_config(run, cache_dir)
    _, abstract = model.abstract(cfg.model)  # the oracle for names and shapes
    shapes = {
        ".".join(str(getattr(k, "key", k)) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
    }
    assert len(shapes) >= 10 and "wte" in shapes
    saved = restore_all(run, cache_dir)
    for step, where in ((None, out), (10, tmp_path / "export10")):
        if step is not None:
            assert cli.main(["export", str(run), "--step", str(step), "--out", str(where)]) == 0
        with np.load(where / "params.npz") as npz:
            exported = dict(npz)
        assert {name: a.shape for name, a in exported.items()} == shapes
        assert all(a.dtype == np.float32 for a in exported.values())
        params = runs.flatten(saved[step or 20]["params"])
        for name, array in exported.items():
            np.testing.assert_array_equal(array, params[name], err_msg=name)
    assert json.loads((out / "export.json").read_text())["step"] == STEPS  # the newest
    assert not np.array_equal(
        np.load(out / "params.npz")["wte"], np.load(tmp_path / "export10" / "params.npz")["wte"]
    )

    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 2  # not empty: nothing lost
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gptjax: error: no checkpoint for step 7 in {run}/checkpoints"


def test_a_reader_opening_while_the_run_deletes_an_old_step_lists_again(tmp_path, monkeypatch):
    """Orbax lists the steps, then reads each one's metadata; a training run rotating its
    checkpoints (checkpoint.keep) can delete one in between (FileNotFoundError, seen in CI on a
    reader of a run that trains): the reader lists again instead of failing."""
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    real, calls = checkpoint.ocp.CheckpointManager, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first listing meets a step deleted under it
            raise FileNotFoundError(2, "No such file or directory", str(directory / "215"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", racing)
    reader = checkpoint.Checkpointer(tmp_path / "run", async_save=False, read_only=True)
    assert len(calls) == 2 and reader.all_steps() == []
    reader.close()
    shutil.rmtree(directory)  # no checkpoints folder at all: that is not a race, it is raised
    calls.clear()
    with pytest.raises(FileNotFoundError):
        checkpoint.Checkpointer(tmp_path / "run", async_save=False, read_only=True)
    assert len(calls) == 1
