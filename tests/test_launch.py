"""gptjax/tools/launch.py: process plans, dry runs for local/SLURM/Kubernetes, failure handling."""

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import ROOT, run_cli
from test_distributed import (
    SLURM,
    child_pids,
    group_is_gone,
    launch,
    losses,
    process_is_gone,
    wait_for,
)

from gptjax import distributed
from gptjax.tools import launch as launcher
from gptjax.tools.launch import LaunchError

INIT = re.compile(
    r"rank (\d+): jax\.distributed\.initialize\(coordinator_address='([^']+)', "
    r"num_processes=(\d+), process_id=(\d+)"
)


def dry_run(capsys, *argv: str, env: dict | None = None) -> str:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    assert launcher.run_from_args(parser.parse_args(argv), env=env or {}) == 0
    return capsys.readouterr().out


def test_local_dry_run_on_cpu(capsys):
    argv = ["--nproc=2", "--devices-per-proc=4", "--platform=cpu", "--dry-run", "--", "train", "c"]
    out = dry_run(capsys, *argv)
    found = INIT.findall(out)
    assert [(rank, count, pid) for rank, _, count, pid in found] == [
        ("0", "2", "0"),
        ("1", "2", "1"),
    ]
    coordinators = {address for _, address, _, _ in found}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    assert out.count("XLA_FLAGS=--xla_force_host_platform_device_count=4") == 2
    assert f"{sys.executable} -m gptjax train c" in out


def test_gpu_plan_gives_each_process_its_own_gpus():
    specs = launcher.plan(2, 2, ["train", "c"], "gpu", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert [spec.env["CUDA_VISIBLE_DEVICES"] for spec in specs] == ["4,5", "6,7"]
    assert "XLA_FLAGS" not in specs[0].env
    with pytest.raises(LaunchError, match="needs 6 GPUs but 4 are visible"):
        launcher.plan(3, 2, ["train", "c"], "gpu", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    one = launcher.plan(1, 1, ["python", "x.py"], "cpu", {"XLA_FLAGS": "--xla_foo=1"})
    assert "GPTJAX_COORDINATOR" not in one[0].env and one[0].argv == ["python", "x.py"]
    assert one[0].env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=1"


def test_dry_run_inside_slurm(capsys):
    out = dry_run(capsys, "--dry-run", "--", "train", "c", env=SLURM)
    assert "cluster environment: slurm" in out
    (rank, address, count, pid), *_ = INIT.findall(out)
    assert (rank, count, pid) == ("5", "8", "5")
    assert address == f"gpu003:{123456 % 4096 + 61440}"


def test_dry_run_inside_a_kubernetes_indexed_job(capsys):
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "JOB_COMPLETION_INDEX": "3",
        "GPTJAX_COORDINATOR": "gptjax-workers-0-0.gptjax:8476",
        "GPTJAX_NUM_PROCESSES": "4",
    }
    out = dry_run(capsys, "--dry-run", "--", "train", "c", env=env)
    assert INIT.findall(out) == [("3", "gptjax-workers-0-0.gptjax:8476", "4", "3")]


def test_cli_dry_run_and_user_errors():
    result = run_cli("launch", "--nproc", "2", "--platform", "cpu", "--dry-run", "--", "train", "c")
    assert result.returncode == 0 and len(INIT.findall(result.stdout)) == 2
    result = run_cli("launch", "--nproc", "0", "--", "train", "c")
    assert result.returncode == 2
    assert result.stderr.strip() == "gptjax: error: --nproc and --devices-per-proc must be >= 1"


FAILING = textwrap.dedent(
    """
    import os, subprocess, sys, time
    if os.environ["GPTJAX_PROCESS_ID"] == "0":
        child = subprocess.Popen(["sleep", "300"])   # a grandchild the launcher must also stop
        print("grandchild", child.pid, flush=True)
        time.sleep(300)
    else:
        time.sleep(1.0)
        print("rank one gives up", file=sys.stderr, flush=True)
        sys.exit(7)
    """
)


def test_one_failure_stops_everyone(tmp_path):
    process, log = launch(tmp_path, "--nproc=2", "--grace=1", "--", sys.executable, "-c", FAILING)
    assert process.wait(timeout=60) == 7
    output = log.read_text()
    assert "[rank 1] rank one gives up" in output
    assert "launch: rank 1 exited with code 7; stopping 1 other(s)" in output
    grandchild = int(re.search(r"\[rank 0\] grandchild (\d+)", output)[1])
    assert wait_for(lambda: process_is_gone(grandchild), 10, "the grandchild to be gone")
    assert all(group_is_gone(pid) for pid in child_pids(log))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killing_a_training_process_ends_the_launch(tmp_path, cache_dir):
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
        "mesh.fsdp=2",
        "train.steps=100000",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=0",
        "--no-progress",
    )
    try:
        pids = wait_for(lambda: len(child_pids(log)) == 2 and child_pids(log), 60, "pids", process)
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and len(losses(run_dir)) >= 2, 240, "step 2", process)
        os.kill(pids[1], signal.SIGKILL)
        code = process.wait(timeout=60)  # the requirement: a non-zero exit within 60 s
    finally:
        process.kill()
    output = log.read_text()
    assert code == 128 + signal.SIGKILL, output[-3000:]
    assert "launch: rank 1 exited with signal SIGKILL; stopping 1 other(s)" in output
    assert all(wait_for(lambda p=p: group_is_gone(p), 10, f"pid {p} gone") for p in pids)


def test_local_py_is_the_same_launcher():
    result = subprocess.run(
        [sys.executable, "launch/local.py", "--nproc=3", "--platform=cpu", "--dry-run", "--"]
        + ["eval", "runs/x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [m[3] for m in INIT.findall(result.stdout)] == ["0", "1", "2"]


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: runs the command once per task with the variables SLURM sets.
while [[ "$1" == --* ]]; do shift; done
for task in 0 1 2 3; do
  SLURM_JOB_ID=4242 SLURM_NTASKS=4 SLURM_PROCID=$task SLURM_LOCALID=$((task % 2)) \\
  SLURM_NODEID=$((task / 2)) SLURM_STEP_NODELIST='gpu-[07-08]' SLURM_STEP_TASKS_PER_NODE='2(x2)' \\
  CUDA_VISIBLE_DEVICES=0,1 "$@" | sed "s/^/$task: /"
done
"""


def test_slurm_template_gives_every_task_the_same_coordinator(tmp_path):
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{srun.parent}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "GPTJAX_DRY_RUN": "1",
        "GPTJAX_HOME": str(ROOT),
        "GPTJAX_VENV": sys.prefix,
    }
    env.pop("JAX_PLATFORMS", None)  # GPU nodes (conftest sets cpu for this process)
    result = subprocess.run(
        ["bash", "launch/slurm.sbatch", "configs/debug.yaml", "train.steps=5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = INIT.findall(result.stdout)
    assert [(count, pid) for _, _, count, pid in found] == [("4", str(i)) for i in range(4)]
    assert {address for _, address, _, _ in found} == {f"gpu-07:{4242 % 4096 + 61440}"}
    assert "local_device_ids=[1]" in result.stdout  # task 1 = second GPU of the first node
    assert "train configs/debug.yaml train.step_timeout=1800 train.steps=5" in result.stdout

    # CPU nodes: fake devices per task, and no GPU for a task to pick.
    cpu = subprocess.run(
        ["bash", "launch/slurm.sbatch", "configs/debug.yaml"],
        capture_output=True,
        text=True,
        env={**env, "GPTJAX_CPU_DEVICES_PER_TASK": "4"},
        cwd=ROOT,
        timeout=120,
    )
    assert cpu.returncode == 0, cpu.stderr
    assert len(INIT.findall(cpu.stdout)) == 4 and "local_device_ids=None" in cpu.stdout
    assert "local_device_ids=[" not in cpu.stdout


def test_slurm_template_refuses_a_missing_venv(tmp_path):
    """No Python with gptjax at $GPTJAX_VENV: one line and exit 2, before any srun (never the
    `python` on PATH, which may lack jax)."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/usr/bin/env bash\necho srun was called\n")
    srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{srun.parent}:{os.environ['PATH']}", "GPTJAX_HOME": str(ROOT)}
    for venv in (tmp_path / "missing", tmp_path):  # no such directory; a directory without bin/
        run = subprocess.run(
            ["bash", "launch/slurm.sbatch", "configs/debug.yaml"],
            capture_output=True,
            text=True,
            env={**env, "GPTJAX_VENV": str(venv)},
            cwd=ROOT,
            timeout=60,
        )
        assert run.returncode == 2 and "srun" not in run.stdout
        assert run.stderr.startswith(
            f"gptjax: error: no Python with gptjax and jax at {venv}/bin/python"
        )
        assert len(run.stderr.strip().splitlines()) == 1


def test_jobset_template_is_consistent():
    jobset = yaml.safe_load((ROOT / "launch" / "k8s" / "jobset.yaml").read_text())
    (workers,) = jobset["spec"]["replicatedJobs"]
    job = workers["template"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert job["completionMode"] == "Indexed"  # JOB_COMPLETION_INDEX = process id
    assert job["parallelism"] == job["completions"] == int(env["GPTJAX_NUM_PROCESSES"])
    # Pod 0 of the JobSet's headless service: <jobset>-<replicated job>-<job index>-<pod index>.
    name = jobset["metadata"]["name"]
    host, port = env["GPTJAX_COORDINATOR"].split(":")
    assert host == f"{name}-{workers['name']}-0-0.{name}"
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    topology = distributed.resolve(
        {**env, "JOB_COMPLETION_INDEX": "1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    )
    assert (topology.num_processes, topology.process_id) == (2, 1)
    assert container["command"][:4] == ["python", "-m", "gptjax", "train"]


GRACEFUL = textwrap.dedent(
    """
    import signal, sys, time
    def stop(number, frame):
        print("checkpoint saved", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def test_a_signal_to_the_launcher_is_passed_on(tmp_path):
    """SIGTERM to the launcher (a preempted job) reaches every process, which may save first."""
    process, log = launch(tmp_path, "--nproc=2", "--", sys.executable, "-c", GRACEFUL)
    try:
        wait_for(lambda: log.read_text().count("] ready") == 2, 30, "both ready", process)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        process.kill()
    output = log.read_text()
    assert code == 0  # every process saved and exited 0: a clean stop, as gptjax's own
    assert "[rank 0] checkpoint saved" in output and "[rank 1] checkpoint saved" in output
    assert all(group_is_gone(pid) for pid in child_pids(log))
