"""gptjax/distributed.py: environment → jax.distributed arguments, config agreement, watchdog,
and the real thing: 2 processes × 4 CPU devices train exactly like 1 process × 8 devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, run_processes, tiny_config

from gptjax import distributed
from gptjax.distributed import DistributedError, first_host, resolve
from gptjax.tools.launch import free_port

SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "gpu[003-004,010],login1",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


# --- resolve: what each kind of cluster gives -------------------------------------------------


def test_nothing_set_is_one_process():
    topology = resolve({"HOME": "/root"})
    assert (topology.num_processes, topology.process_id, topology.source) == (1, 0, "single")


def test_explicit_variables():
    env = {
        "GPTJAX_COORDINATOR": "10.0.0.7:1234",
        "GPTJAX_NUM_PROCESSES": "4",
        "GPTJAX_PROCESS_ID": "3",
    }
    topology = resolve(env)
    assert (topology.coordinator, topology.num_processes, topology.process_id) == (
        "10.0.0.7:1234",
        4,
        3,
    )
    assert resolve({**env, "GPTJAX_COORDINATOR": "head"}).coordinator == "head:8476"
    ids = resolve({**env, "GPTJAX_LOCAL_DEVICE_IDS": "2,3"}).local_device_ids
    assert ids == (2, 3)


def test_kubernetes_indexed_job_takes_the_completion_index():
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "GPTJAX_COORDINATOR": "gptjax-workers-0-0.gptjax:8476",
        "GPTJAX_NUM_PROCESSES": "4",
        "JOB_COMPLETION_INDEX": "2",
    }
    topology = resolve(env)
    assert (topology.coordinator, topology.num_processes, topology.process_id) == (
        "gptjax-workers-0-0.gptjax:8476",
        4,
        2,
    )
    assert "process_id=2" in topology.describe()


def test_slurm_matches_jax_own_detection(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster  # the oracle: what JAX would do

    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    topology = resolve(SLURM)
    expected = SlurmCluster.get_coordinator_address(None, None)
    assert topology.coordinator == expected == "gpu003:" + expected.split(":")[1]
    assert topology.num_processes == SlurmCluster.get_process_count() == 8
    assert topology.process_id == SlurmCluster.get_process_id() == 5
    # 4 tasks on this node, all seeing the node's GPUs: each task takes its local GPU ...
    assert topology.local_device_ids == (1,)
    assert resolve({**SLURM, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}).local_device_ids == (1,)
    # ... unless SLURM bound one GPU (or two) per task already.
    assert resolve({**SLURM, "CUDA_VISIBLE_DEVICES": "1"}).local_device_ids is None
    assert resolve({**SLURM, "CUDA_VISIBLE_DEVICES": "2,3"}).local_device_ids is None
    assert resolve({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x8)"}).local_device_ids is None
    # CPU tasks (each with its own fake devices) have no GPU to choose.
    assert resolve({**SLURM, "JAX_PLATFORMS": "cpu"}).local_device_ids is None
    assert resolve({**SLURM, "GPTJAX_COORDINATOR_PORT": "999"}).coordinator == "gpu003:999"
    assert resolve({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).num_processes == 1


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node001", "node001"),
        ("node001,node002", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,009-015]", "node007"),
        ("rack[2-3]-node[07-08],x", "rack2-node07"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_open_mpi_leaves_the_coordinator_to_jax():
    topology = resolve({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"})
    assert (topology.coordinator, topology.num_processes, topology.process_id) == (None, 4, 1)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GPTJAX_NUM_PROCESSES": "2", "GPTJAX_PROCESS_ID": "0"}, "GPTJAX_COORDINATOR"),
        ({"GPTJAX_COORDINATOR": "h:1"}, "GPTJAX_NUM_PROCESSES"),
        ({"GPTJAX_COORDINATOR": "h:1", "GPTJAX_NUM_PROCESSES": "2"}, "GPTJAX_PROCESS_ID"),
        ({"GPTJAX_COORDINATOR": "h:1", "GPTJAX_NUM_PROCESSES": "two"}, "not an integer"),
        (
            {"GPTJAX_COORDINATOR": "h:1", "GPTJAX_NUM_PROCESSES": "2", "GPTJAX_PROCESS_ID": "2"},
            "outside 0..1",
        ),
        ({"GPTJAX_LOCAL_DEVICE_IDS": "0;1"}, "GPTJAX_LOCAL_DEVICE_IDS"),
    ],
)
def test_broken_environments_say_what_is_wrong(env, words):
    with pytest.raises(DistributedError, match=words):
        resolve(env)


# --- watchdog --------------------------------------------------------------------------------

WATCHDOG_SCRIPT = """
import sys, time
from gptjax.distributed import Watchdog
dog = Watchdog(0.5)
dog.pause(); time.sleep(1.5)          # paused (compiling): must not fire
dog.pet("step 7"); time.sleep(1.0 if sys.argv[1] == "pet" else 30)
print("survived", flush=True)
"""


def test_watchdog_exits_with_the_step_it_waited_for():
    hung = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT, "hang"], capture_output=True, text=True, timeout=25
    )
    assert hung.returncode == distributed.WATCHDOG_EXIT_CODE
    assert "survived" not in hung.stdout
    assert "waiting for step 7" in hung.stderr and "train.step_timeout=0.5" in hung.stderr


# --- several real processes -------------------------------------------------------------------

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def launch(tmp_path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, object]:
    """`gptjax launch ARGS` in the background; output (both streams) goes to a file."""
    log = tmp_path / "launch.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gptjax", "launch", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return process, log


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the launch ended (code {process.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def child_pids(log) -> list[int]:
    return [int(pid) for pid in re.findall(r"launch: rank \d+ pid (\d+)", log.read_text())]


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that still run (zombies whose parent is a container's
    non-reaping pid 1 do not count: they are dead)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def group_is_gone(pid: int) -> bool:
    return not live_group_members(pid)


def process_is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, cache_dir):
    """2 processes × 4 devices on mesh (2,2,2) give the losses of 1 process × 8 devices."""
    from gptjax.training import loop

    common = [*MESH, "train.steps=10", "train.log_every=1", "checkpoint.every=0"]
    single = tmp_path / "single"
    loop.train(tiny_config(single, cache_dir, *common), progress=False)  # also warms the cache

    multi = tmp_path / "multi"
    process, log = launch(
        tmp_path,
        "--nproc=2",
        "--devices-per-proc=4",
        "--",
        "train",
        "configs/debug.yaml",
        f"run_dir={multi}",
        f"data.cache_dir={cache_dir}",
        *common,
        "--no-progress",
    )
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    expected, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, 11))
    assert got == pytest.approx(expected, rel=1e-5)
    output = log.read_text()
    # Only process 0 prints the result line; both processes wrote their checkpoint shards.
    assert output.count('"final_step": 10') == 1 and '[rank 0] {"step": 10' in output
    assert (multi / "checkpoints" / "10").is_dir()


def test_a_missing_coordinator_is_one_line_after_init_timeout(tmp_path):
    env = {
        "GPTJAX_COORDINATOR": f"127.0.0.1:{free_port()}",  # nobody listens there
        "GPTJAX_NUM_PROCESSES": "2",
        "GPTJAX_PROCESS_ID": "1",
    }
    args = ["train", "configs/debug.yaml", f"run_dir={tmp_path}", "distributed.init_timeout=2"]
    result = run_cli(*args, env=env, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("gptjax: error: process 1 of 2 could not join the coordinator 127.0.0.1:")
    )
    assert "within 2 s (distributed.init_timeout)" in result.stderr


@pytest.mark.multiprocess
def test_different_configs_are_refused(tmp_path, cache_dir):
    """Two processes started by hand (explicit variables) with different overrides."""
    args = ["train", "configs/debug.yaml", f"run_dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    args += ["distributed.init_timeout=60", "distributed.heartbeat_timeout=10"]
    results = run_processes([[*args, "train.steps=10"], [*args, "train.steps=12"]], timeout=120)
    for code, err in results:
        assert code == 2, err[-2000:]
        assert "gptjax: error: the 2 processes were started with different configs" in err
        assert "train.steps is 12 in process 1 but 10 in process 0" in err
        assert "Traceback" not in err


@pytest.mark.multiprocess
@pytest.mark.slow
def test_watchdog_ends_a_run_whose_peer_hangs(tmp_path, cache_dir):
    """Freeze process 1 (SIGSTOP): process 0 blocks in a collective, its watchdog names the
    step and exits, and the launcher then stops the frozen process too."""
    run_dir = tmp_path / "run"
    process, log = launch(
        tmp_path,
        "--nproc=2",
        "--devices-per-proc=4",
        "--grace=2",
        "--",
        "train",
        "configs/debug.yaml",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        *MESH,
        "train.steps=100000",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=0",
        "train.step_timeout=4",
        "--no-progress",
    )
    try:
        pids = wait_for(lambda: len(child_pids(log)) == 2 and child_pids(log), 60, "pids", process)
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and len(losses(run_dir)) >= 3, 240, "step 3", process)
        os.kill(pids[1], signal.SIGSTOP)
        seen = max(losses(run_dir))
        code = process.wait(timeout=60)
    finally:
        process.kill()
    output = log.read_text()
    assert code == distributed.WATCHDOG_EXIT_CODE, output[-3000:]
    pattern = r"\[rank 0\] gptjax: error: watchdog: .* waiting for (?:the batch of )?step (\d+)"
    hung = re.search(pattern, output)
    assert hung, output[-3000:]
    assert int(hung[1]) > seen  # a step after the last one that completed
    assert "rank 0 exited with code 3" in output
    assert all(wait_for(lambda p=p: group_is_gone(p), 10, f"pid {p} gone") for p in pids)
