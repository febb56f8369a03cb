"""A sweep as a cluster job with one task per run: a SLURM array script or a Kubernetes Indexed Job.

Task i runs `gptjax sweep run SPEC --index i --plan DIGEST`: the task re-expands the spec, checks
that it still gives the same runs as when the job was written (DIGEST), and runs run i as any
gptjax run (so a run on several nodes joins up through gptjax's own SLURM launch). Rerunning a
task whose run finished does nothing; an interrupted one resumes.
"""

from __future__ import annotations

import shlex

import yaml

from gptjax.experiments.spec import Sweep, SweepError


def _table(sweep: Sweep) -> list[str]:
    return [f"#   {run.index:>4}  {run.name}  {run.label}" for run in sweep.runs]


def slurm(
    sweep: Sweep,
    spec_path: str,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpus_per_task: int = 8,
    time: str = "24:00:00",
    parallel: int = 0,
) -> str:
    """A bash script for `sbatch`: one array task per run (at most `parallel` at once)."""
    if nodes < 1 or gpus_per_node < 0 or cpus_per_task < 1 or parallel < 0:
        raise SweepError("--nodes and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    last = len(sweep.runs) - 1
    throttle = f"%{parallel}" if parallel else ""
    gpus = [f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    command = (
        f"python -m gptjax sweep run {shlex.quote(spec_path)} "
        f'--index "$SLURM_ARRAY_TASK_ID" --plan {sweep.digest}'
    )
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# gptjax sweep {spec_path}: {len(sweep.runs)} runs, one array task each",
            "# (`gptjax sweep emit slurm`). Submit from the directory the spec's paths start from:",
            f"#   sbatch {shlex.quote(spec_path.removesuffix('.yaml') + '.sbatch')}",
            "# Array index -> run (directory under the sweep's dir; its output in RUN/sweep.log):",
            *_table(sweep),
            f"#SBATCH --job-name=sweep-{sweep.directory.name}",
            f"#SBATCH --array=0-{last}{throttle}",
            f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1",
            *gpus,
            f"#SBATCH --cpus-per-task={cpus_per_task}",
            f"#SBATCH --time={time}",
            "#SBATCH --output=%x-%A_%a.out",
            "set -euo pipefail",
            'cd "${GPTJAX_HOME:-${SLURM_SUBMIT_DIR:-.}}"',
            "VENV=${GPTJAX_VENV:-.venv}",
            'if [ -f "$VENV/bin/activate" ]; then',
            "  # shellcheck disable=SC1091",
            '  source "$VENV/bin/activate"',
            "fi",
            "export PYTHONUNBUFFERED=1",
            "# One process per node; several nodes join up as one run (gptjax/distributed.py).",
            f"exec srun --kill-on-bad-exit=1 {command}",
            "",
        ]
    )


def kubernetes(
    sweep: Sweep,
    spec_path: str,
    image: str = "ghcr.io/YOUR_ORG/gptjax:latest",
    gpus: int = 1,
    parallel: int = 0,
    claim: str = "gptjax-shared",
) -> str:
    """A Kubernetes Indexed Job: completion index i runs run i; one pod (one host) per run."""
    if gpus < 0 or parallel < 0:
        raise SweepError("--gpus and --parallel must be >= 0")
    name = f"sweep-{sweep.directory.name}".lower().replace("_", "-")[:52]
    command = (
        f"exec python -m gptjax sweep run {shlex.quote(spec_path)} "
        f'--index "$JOB_COMPLETION_INDEX" --plan {sweep.digest}'
    )
    container = {
        "name": "gptjax",
        "image": image,
        "workingDir": "/app",
        "command": ["sh", "-c", command],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": len(sweep.runs),
            "parallelism": parallel or len(sweep.runs),
            "backoffLimitPerIndex": 2,  # a preempted pod is retried and resumes its run
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": claim}}],
                }
            },
        },
    }
    header = [
        f"# gptjax sweep {spec_path}: {len(sweep.runs)} runs, one pod each",
        "# (`gptjax sweep emit k8s`). The sweep's dir must be on the shared volume",
        "# (e.g. dir: /shared/sweeps/NAME in the spec).",
        "#   kubectl apply -f THIS_FILE",
        "# Completion index -> run:",
        *_table(sweep),
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(job, sort_keys=False)
