"""Multi-process start-up: who is the coordinator, how many processes, which one am I.

`resolve(env)` reads the environment (a plain dict, so tests can pass fake clusters) and says
what `jax.distributed.initialize` will be given:

- explicit: GPTJAX_COORDINATOR=host:port, GPTJAX_NUM_PROCESSES=N, GPTJAX_PROCESS_ID=i (the id
  may instead come from JOB_COMPLETION_INDEX, the Kubernetes indexed-Job index, or SLURM_PROCID);
- SLURM (`srun`): SLURM_NTASKS processes, id SLURM_PROCID, coordinator the first host of
  SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST / SLURM_NODELIST) on the port JAX itself would pick;
- Open MPI (`mpirun`): count and rank from OMPI_COMM_WORLD_*, the coordinator left to JAX;
- nothing of the above: one process, nothing to initialise.

`initialize(cfg)` then starts jax.distributed (before any other JAX call) and checks that every
process resolved the same config. `Watchdog` turns a hang into an exit with a message.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from gptjax.config import Config, flatten
from gptjax.errors import UserError

DEFAULT_PORT = 8476
WATCHDOG_EXIT_CODE = 3


class DistributedError(UserError, ValueError):
    """A broken multi-process environment or set-up; the message is one line."""


@dataclass(frozen=True)
class Topology:
    """What jax.distributed.initialize receives; num_processes == 1 means: do not initialise."""

    num_processes: int
    process_id: int
    coordinator: str | None  # "host:port"; None with several processes: JAX detects it
    local_device_ids: tuple[int, ...] | None = None  # None: every device this process sees
    source: str = "single"  # explicit | slurm | openmpi | single

    def describe(self) -> str:
        """One line, e.g. `jax.distributed.initialize(coordinator_address='h:1', ...) [slurm]`."""
        if self.num_processes == 1:
            return "single process: jax.distributed is not initialised [single]"
        ids = None if self.local_device_ids is None else list(self.local_device_ids)
        coordinator = repr(self.coordinator) if self.coordinator else "None (detected by JAX)"
        return (
            f"jax.distributed.initialize(coordinator_address={coordinator}, "
            f"num_processes={self.num_processes}, process_id={self.process_id}, "
            f"local_device_ids={ids}) [{self.source}]"
        )


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'.

    Several bracket groups are allowed ('rack[1-2]-node[07-08]' -> 'rack1-node07').
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry or entry.count("[") != entry.count("]"):
        raise DistributedError(f"cannot read the SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", entry)


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE like '4(x2),1'; None if unknown."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else None


def _port(env: Mapping[str, str], default: int) -> int:
    for name in ("GPTJAX_COORDINATOR_PORT", "JAX_COORDINATOR_PORT"):
        if env.get(name):
            return _int(env, name)
    return default


def _explicit(env: Mapping[str, str], ids: tuple[int, ...] | None) -> Topology:
    if not env.get("GPTJAX_NUM_PROCESSES"):
        raise DistributedError("GPTJAX_COORDINATOR is set but GPTJAX_NUM_PROCESSES is not")
    count = _int(env, "GPTJAX_NUM_PROCESSES")
    id_names = ("GPTJAX_PROCESS_ID", "JOB_COMPLETION_INDEX", "SLURM_PROCID")
    id_name = next((name for name in id_names if env.get(name)), None)
    if count > 1 and not env.get("GPTJAX_COORDINATOR"):
        raise DistributedError(
            f"GPTJAX_NUM_PROCESSES={count} needs GPTJAX_COORDINATOR=host:port "
            "(the address of process 0)"
        )
    if count > 1 and id_name is None:
        raise DistributedError(
            "GPTJAX_NUM_PROCESSES is set but not the process id: set GPTJAX_PROCESS_ID "
            "(or run as a Kubernetes indexed Job, which sets JOB_COMPLETION_INDEX)"
        )
    coordinator = env.get("GPTJAX_COORDINATOR", "").strip() or None
    if coordinator and ":" not in coordinator:
        coordinator = f"{coordinator}:{_port(env, DEFAULT_PORT)}"
    process_id = _int(env, id_name) if id_name else 0
    return Topology(count, process_id, coordinator, ids, "explicit")


def _slurm(env: Mapping[str, str], ids: tuple[int, ...] | None) -> Topology:
    count = _int(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS")
    names = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nodes = next((env[name] for name in names if env.get(name)), None)
    if count > 1 and nodes is None:
        raise DistributedError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_NODELIST")
    # The port JAX's own SLURM detection picks: an ephemeral port derived from the job id.
    port = _port(env, _int(env, "SLURM_JOB_ID") % 4096 + 65536 - 4096)
    tasks_here = _slurm_tasks_on_node(env)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # Several tasks on a node that all see the node's GPUs: task i takes local device i.
    # (With --gpus-per-task / --gpu-bind SLURM already narrowed CUDA_VISIBLE_DEVICES.)
    shared = not visible or len(visible) == tasks_here
    # On CPU (JAX_PLATFORMS=cpu: fake devices per task, launch/slurm.sbatch) there is no GPU
    # to pick: every task drives its own CPU devices.
    gpus = env.get("JAX_PLATFORMS", "").strip().lower() != "cpu"
    if (
        ids is None
        and tasks_here
        and tasks_here > 1
        and shared
        and gpus
        and env.get("SLURM_LOCALID")
    ):
        ids = (_int(env, "SLURM_LOCALID"),)
    coordinator = f"{first_host(nodes)}:{port}" if nodes else None
    return Topology(count, _int(env, "SLURM_PROCID"), coordinator, ids, "slurm")


def resolve(env: Mapping[str, str] | None = None) -> Topology:
    """The process topology the environment describes (see the module docstring)."""
    env = os.environ if env is None else env
    ids = None
    if env.get("GPTJAX_LOCAL_DEVICE_IDS"):
        try:
            ids = tuple(int(x) for x in env["GPTJAX_LOCAL_DEVICE_IDS"].split(","))
        except ValueError:
            raise DistributedError(
                f"GPTJAX_LOCAL_DEVICE_IDS={env['GPTJAX_LOCAL_DEVICE_IDS']!r}: "
                "use comma-separated integers, e.g. 0,1"
            ) from None
    if env.get("GPTJAX_COORDINATOR") or env.get("GPTJAX_NUM_PROCESSES"):
        topology = _explicit(env, ids)
    elif env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS") and env.get("SLURM_PROCID"):
        topology = _slurm(env, ids)
    elif env.get("OMPI_COMM_WORLD_SIZE") and env.get("OMPI_COMM_WORLD_RANK"):
        count, rank = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK")
        topology = Topology(count, rank, None, ids, "openmpi")
    else:
        return Topology(1, 0, None, ids, "single")
    if topology.num_processes < 1 or not 0 <= topology.process_id < topology.num_processes:
        raise DistributedError(
            f"process id {topology.process_id} is outside 0..{topology.num_processes - 1} "
            f"({topology.source} environment)"
        )
    if topology.num_processes == 1:
        return Topology(1, 0, None, topology.local_device_ids, "single")
    return topology


def initialize(cfg: Config, env: Mapping[str, str] | None = None) -> Topology:
    """Start jax.distributed as the environment says (no-op for one process), then compare the
    resolved configs of all processes. Call before any other JAX function touches a device."""
    import jax

    topology = resolve(env)
    if topology.num_processes == 1 or jax.distributed.is_initialized():
        if jax.process_count() > 1:
            check_same_config(cfg)
        return topology
    timeout = cfg.distributed.init_timeout
    hint = (
        " (under SLURM, start one process per task with srun)" if topology.source == "slurm" else ""
    )
    failure = (
        f"process {topology.process_id} of {topology.num_processes} could not join the "
        f"coordinator {topology.coordinator or '(auto)'} within {timeout} s "
        f"(distributed.init_timeout); are all processes started, and is it reachable?{hint}"
    )
    # XLA aborts the process (a C++ fatal error) when joining times out: end it first, in one line.
    deadline = threading.Timer(timeout, _exit_with, (failure, 2))
    deadline.daemon = True
    deadline.start()
    try:
        jax.distributed.initialize(
            coordinator_address=topology.coordinator,
            num_processes=topology.num_processes,
            process_id=topology.process_id,
            local_device_ids=list(topology.local_device_ids) if topology.local_device_ids else None,
            cluster_detection_method="deactivate" if topology.coordinator else None,
            initialization_timeout=timeout + 30,
            heartbeat_timeout_seconds=cfg.distributed.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.distributed.heartbeat_timeout,
        )
    except Exception as error:  # XlaRuntimeError (DEADLINE_EXCEEDED etc.) has no public type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(f"{failure}: {first[:300]}") from None
    finally:
        deadline.cancel()
    check_same_config(cfg)
    return topology


# Local paths may differ between hosts; everything else must be identical.
_LOCAL_KEYS = (("data", "cache_dir"),)


def _comparable_yaml(cfg: Config) -> str:
    import yaml

    raw = cfg.to_dict()
    for section, key in _LOCAL_KEYS:
        raw.get(section, {}).pop(key, None)
    return yaml.safe_dump(raw, sort_keys=True)


def gather_ints(value: int) -> list[int]:
    """`value` of every process, in process order (a collective: every process must call it;
    with one process, just [value])."""
    import jax

    if jax.process_count() == 1:
        return [int(value)]
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value)))]


def _first_difference(a: str, b: str) -> tuple[str, object, object]:
    """The first differing `section.key` of two configs (from _comparable_yaml) and its values."""
    import yaml

    a, b = flatten(yaml.safe_load(a)), flatten(yaml.safe_load(b))
    key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")
    return key, a.get(key), b.get(key)


def check_same_config(cfg: Config) -> None:
    """Refuse to run (DistributedError on every process) unless all resolved configs agree."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    text = _comparable_yaml(cfg)
    data = text.encode()
    digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    if (digests == digests[0]).all():
        return
    # Gather everyone's text (padded to the longest) so that every process names the same key.
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    texts = np.asarray(multihost_utils.process_allgather(padded))
    first_bad = int(np.flatnonzero((digests != digests[0]).any(axis=1))[0])
    reference = bytes(texts[0][: lengths[0]]).decode()
    other = bytes(texts[first_bad][: lengths[first_bad]]).decode()
    key, theirs, ours = _first_difference(other, reference)
    raise DistributedError(
        f"the {jax.process_count()} processes were started with different configs: {key} is "
        f"{theirs!r} in process {first_bad} but {ours!r} in process 0; start every process "
        "with the same config file and overrides"
    )


def _exit_with(message: str, code: int) -> None:
    print(f"gptjax: error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


class Watchdog:
    """Exits the process (os._exit) when `pet` is not called for `timeout` seconds.

    `pet(what)` records progress and what the loop is about to wait for (e.g. "step 12");
    `pause()` stops the clock (compilation). With timeout 0 the watchdog does nothing.
    """

    def __init__(self, timeout: float, exit_code: int = WATCHDOG_EXIT_CODE):
        self.timeout = timeout
        self.exit_code = exit_code
        self._what = "start-up"
        self._last = time.monotonic()
        self._paused = True  # start-up (data, compilation) is not watched: the loop pets first
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="gptjax-watchdog", daemon=True)
            self._thread.start()

    def pet(self, what: str) -> None:
        self._what, self._last, self._paused = what, time.monotonic(), False

    def pause(self) -> None:
        self._paused = True

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if not self._paused and idle > self.timeout:
                _exit_with(
                    f"watchdog: no progress for {idle:.0f} s while waiting for {self._what} "
                    f"(train.step_timeout={self.timeout:g}); a process is stuck or a peer died; "
                    "exiting",
                    self.exit_code,
                )
