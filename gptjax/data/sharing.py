"""Several processes, one data cache: who prepares it.

Every process of a multi-process run needs the prepared data, and their caches may be one shared
directory (a shared filesystem) or private ones (local disks, or `data.cache_dir` set per host).
`prepare_once(root, prepare)` finds out which: each process drops a probe file into its cache
directory, and after a barrier looks for the others' probes. Processes that see each other's
probes share a cache; the lowest-numbered of them prepares it and the others wait for it (by
polling for a result file in that directory: no collective is held open during a long
preparation), then open what it wrote. A process that sees no one else's probe prepares its own
cache, in parallel with the others. At the end every process learns whether any failed, so all
stop together with the same line. One process (jax.distributed not initialised): just prepare.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gptjax import atomic
from gptjax.data.corpus import DataError

T = TypeVar("T")
POLL_S = 0.5
log = logging.getLogger("gptjax")


def prepare_once(root: Path, prepare: Callable[[], T]) -> T:
    """Run `prepare` (which fills the cache under `root`) so that processes sharing `root` run it
    once, and return its result on every process; DataError on every process if any failed."""
    import jax

    from gptjax import distributed  # here: distributed imports config, which imports data

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return prepare()
    me, count = jax.process_index(), jax.process_count()
    nonce = distributed.gather_ints(int.from_bytes(os.urandom(4), "little") >> 1)[0]  # process 0's
    name = f".gptjax-share-{nonce}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{name}-probe-{me}").write_text("")
        writable = 1
    except OSError as error:
        writable, reason = 0, f"data cache {root} is not writable: {error.strerror}"
    distributed.gather_ints(0)  # every probe is written
    group = [i for i in range(count) if (root / f"{name}-probe-{i}").exists()] or [me]
    distributed.gather_ints(0)  # every process has looked
    (root / f"{name}-probe-{me}").unlink(missing_ok=True)
    leader = group[0]

    result, error, raised = None, None, None

    def attempt() -> None:
        nonlocal result, error, raised
        try:
            result = prepare()
        except Exception as failure:  # noqa: BLE001 - told to the others, then raised here
            error, raised = str(failure) or type(failure).__name__, failure

    done = root / f"{name}-done-{leader}"
    if not writable:
        error = reason
    elif leader == me:
        if len(group) > 1:
            others = ", ".join(str(i) for i in group[1:])
            log.info("process %d prepares the data cache %s; %s wait for it", me, root, others)
        attempt()
        if len(group) > 1:
            atomic.write_file(done, json.dumps({"error": error}))
    else:
        while not done.exists():  # a dead leader ends the job through JAX's heartbeat
            time.sleep(POLL_S)
        error = json.loads(done.read_text())["error"]
        if error is None:
            attempt()  # opens what the leader wrote
    failed = [i for i, flag in enumerate(distributed.gather_ints(error is not None)) if flag]
    if leader == me and len(group) > 1:
        done.unlink(missing_ok=True)
    if raised is not None:
        raise raised
    if failed:
        if error is None:
            error = f"process {failed[0]} could not prepare the data (its error is in its output)"
        raise DataError(error)
    return result
