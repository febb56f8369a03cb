"""`gptjax launch`: start N cooperating processes on this machine (or show what a cluster gives).

    gptjax launch --nproc 2 --devices-per-proc 4 -- train configs/debug.yaml mesh.fsdp=2
    gptjax launch --dry-run -- train configs/gpt2_small.yaml     # inside srun / a k8s pod

Local mode (`--nproc N`): a free coordinator port on 127.0.0.1; each process gets GPTJAX_*
variables (see gptjax/distributed.py) and its devices: on CPU its own K fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count=K), on GPUs K GPUs of its own
(CUDA_VISIBLE_DEVICES). Output lines are prefixed with the rank. If a process fails, the others
are stopped (their whole process group: SIGTERM, then SIGKILL after a grace period) and the
launcher exits with the failed process's code. Without `--nproc` the launcher runs the command
once, as the process the cluster environment (SLURM, Kubernetes, Open MPI) says this is.

`--dry-run` prints each process's command, its environment and the resulting
jax.distributed.initialize arguments, and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gptjax import distributed
from gptjax.errors import UserError

GPTJAX_COMMANDS = ("train", "sample", "eval", "bench", "plan", "plot")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class LaunchError(UserError, ValueError):
    """A launcher mistake (bad arguments, too few GPUs); the message is one line."""


@dataclass
class ProcessSpec:
    rank: int
    argv: list[str]
    env: dict[str, str]  # variables set for this process on top of the launcher's environment


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def count_gpus(env: Mapping[str, str]) -> int:
    """NVIDIA GPUs this launcher may hand out (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`)."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def detect_platform(env: Mapping[str, str]) -> str:
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if platforms and "cuda" not in platforms and "gpu" not in platforms:
        return "cpu"
    return "gpu" if count_gpus(env) else "cpu"


def child_argv(command: Sequence[str]) -> list[str]:
    """`train ...` -> python -m gptjax train ...; anything else runs as given."""
    if not command:
        raise LaunchError("nothing to launch: add the command after --, e.g. -- train CONFIG")
    if command[0] in GPTJAX_COMMANDS:
        return [sys.executable, "-m", "gptjax", *command]
    return list(command)


def plan(
    nproc: int,
    devices_per_proc: int,
    command: Sequence[str],
    platform: str,
    env: Mapping[str, str],
    port: int | None = None,
) -> list[ProcessSpec]:
    """The processes to start locally: their argv and the variables each one gets."""
    if nproc < 1 or devices_per_proc < 1:
        raise LaunchError("--nproc and --devices-per-proc must be >= 1")
    argv = child_argv(command)
    common = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": env.get("TQDM_MININTERVAL", "5")}
    if nproc > 1:
        port = port or free_port()
        common |= {"GPTJAX_COORDINATOR": f"127.0.0.1:{port}", "GPTJAX_NUM_PROCESSES": str(nproc)}
    if platform == "cpu":
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
        flags = " ".join([*kept, f"{_DEVICE_COUNT_FLAG}={devices_per_proc}"])
        common |= {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        gpu_groups = None
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else None
        ids = ids or [str(i) for i in range(count_gpus(env))]
        if nproc * devices_per_proc > len(ids):
            raise LaunchError(
                f"--nproc {nproc} x --devices-per-proc {devices_per_proc} needs "
                f"{nproc * devices_per_proc} GPUs but {len(ids)} are visible"
            )
        gpu_groups = [ids[r * devices_per_proc : (r + 1) * devices_per_proc] for r in range(nproc)]
    specs = []
    for rank in range(nproc):
        own = dict(common)
        if nproc > 1:
            own["GPTJAX_PROCESS_ID"] = str(rank)
        if gpu_groups is not None:
            own["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_groups[rank])
        specs.append(ProcessSpec(rank, argv, own))
    return specs


def describe(spec: ProcessSpec, env: Mapping[str, str]) -> str:
    """Two lines for --dry-run: the command with its variables, and what JAX will be given."""
    words = [f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())]
    topology = distributed.resolve({**env, **spec.env})
    return (
        f"rank {spec.rank}: {' '.join([*words, shlex.join(spec.argv)])}\n"
        f"rank {spec.rank}: {topology.describe()}"
    )


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
    """Copy a child's output line by line ('\\r' also ends a line), each line prefixed."""
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line.rstrip("\r\n") + "\n")
            out.flush()
    stream.close()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def run(specs: Sequence[ProcessSpec], grace: float = 5.0, poll: float = 0.1) -> int:
    """Start the processes, relay their output, stop them all when one fails; the exit code.

    A failure (non-zero exit or a signal) stops the others: SIGTERM, SIGKILL after `grace` s.
    SIGINT/SIGTERM to the launcher is passed on as SIGTERM (gptjax then checkpoints and exits);
    a second one kills everything at once.
    """
    lock = threading.Lock()
    width = len(str(len(specs) - 1))
    processes: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    interrupted: list[int] = []
    failed: tuple[int, int] | None = None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda number, _: interrupted.append(number))
    try:
        for spec in specs:
            processes.append(_start(spec, f"[rank {spec.rank:>{width}}] ", lock, pumps))
        forwarded = False
        while len(interrupted) < 2:
            codes = [process.poll() for process in processes]
            failed = next(((s.rank, c) for s, c in zip(specs, codes, strict=True) if c), None)
            if failed is not None or all(code == 0 for code in codes):
                break
            if interrupted and not forwarded:
                name = signal.Signals(interrupted[0]).name
                _say(lock, f"launch: {name}: asking every process to stop (again to kill)")
                for process in processes:
                    _signal_group(process, signal.SIGTERM)
                forwarded = True
            time.sleep(poll)
        alive = sum(process.poll() is None for process in processes)
        if failed is not None:
            rank, code = failed
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
            _say(lock, f"launch: rank {rank} exited with {how}; stopping {alive} other(s)")
        elif len(interrupted) > 1:
            _say(lock, f"launch: second signal: killing {alive} process(es)")
            grace = 0.0
    finally:
        _stop_all(processes, grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=2)
    if failed is not None:
        return _exit_code(failed[1])
    if interrupted and any(process.returncode != 0 for process in processes):
        return 128 + interrupted[0]
    return 0  # finished, or stopped cleanly by a signal (every process checkpointed, exit 0)


def _start(spec: ProcessSpec, prefix: str, lock: threading.Lock, pumps: list) -> subprocess.Popen:
    try:
        process = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: killpg reaches its children
        )
    except OSError as error:
        raise LaunchError(f"cannot start {spec.argv[0]!r}: {error.strerror}") from None
    for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
        pump = threading.Thread(target=_pump, args=(stream, out, prefix, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    _say(lock, f"launch: rank {spec.rank} pid {process.pid}: {shlex.join(spec.argv)}")
    return process


def _stop_all(processes: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM every group (SIGCONT too, for stopped ones), SIGKILL what is left after `grace`."""
    for process in processes:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            _signal_group(process, signal.SIGCONT)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:  # the group may outlive its leader: always sweep it
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _say(lock: threading.Lock, text: str) -> None:
    with lock:
        print(text, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None, help="local processes to start")
    parser.add_argument(
        "--devices-per-proc", type=int, default=1, help="fake CPU devices or GPUs per process"
    )
    parser.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print commands, start nothing")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train CONFIG [key=value]")


def run_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.nproc is None:  # cluster mode: this process is one of the cluster's
        topology = distributed.resolve(env)
        specs = [ProcessSpec(topology.process_id, child_argv(command), {})]
        if args.dry_run:
            print(f"cluster environment: {topology.source}")
            print(describe(specs[0], env))
            return 0
        return run(specs, grace=args.grace)
    platform = detect_platform(env) if args.platform == "auto" else args.platform
    specs = plan(args.nproc, args.devices_per_proc, command, platform, env)
    if args.dry_run:
        print(f"local launch: {args.nproc} process(es) on {platform}")
        for spec in specs:
            print(describe(spec, env))
        return 0
    return run(specs, grace=args.grace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launch/local.py (`gptjax launch` goes through gptjax.cli)."""
    parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (LaunchError, distributed.DistributedError) as error:
        print(f"gptjax: error: {error}", file=sys.stderr)
        return 2
