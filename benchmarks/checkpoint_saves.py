"""Time and host memory of repeated checkpoint saves of one config's TrainState.

    python benchmarks/checkpoint_saves.py [CONFIG] [key=value ...] [--saves N] [--dir DIR]

Initialises the state on one device (f32 parameters and Adam moments), then saves it N times
with gptjax.checkpoint.Checkpointer (asynchronous, keep 2), changing every array between saves
as a training step would. Adam's moments are filled with random numbers: zeros would compress
to nothing on disk (Orbax writes zstd-compressed chunks). Per save it records the blocking part
(until `save` returns and the loop could go on), the total (until the write is committed) and
the process's resident memory (RSS) after the save. Prints a summary JSON line (and one per
save with --verbose). Host memory must stay flat: the growth from save 5 to save N is reported
as `rss_growth_mb`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")

from gptjax import config  # noqa: E402
from gptjax.core import steps  # noqa: E402
from gptjax.training import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "cpu_small.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--saves", type=int, default=50)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    parser.add_argument("--verbose", action="store_true", help="one JSON line per save")
    args = parser.parse_args()

    fixed = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "model.param_dtype=float32"]
    cfg = config.load(args.config, [*args.overrides, *fixed])
    setup = steps.build(cfg, jax.devices()[:1])
    state = steps.init_state(setup)
    # Adam's moments start at zero, which compresses to nothing; after training they are dense.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state["opt_state"]))))
    state["opt_state"] = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 1e-3 if x.ndim else x,
        state["opt_state"],
    )
    nudge = jax.jit(  # new buffers with new values, like a training step (the old ones donated)
        lambda s: jax.tree.map(lambda x: x + 1 if x.dtype.kind == "i" else x * 1.0000001, s),
        donate_argnums=0,
    )
    state = jax.block_until_ready(nudge(state))
    work = Path(args.dir or tempfile.mkdtemp(prefix="gptjax-ckpt-bench-"))
    ckpt = checkpoint.Checkpointer(work, keep=2, async_save=True)
    rows = []
    start_rss, _ = rss_mb()
    try:
        for i in range(1, args.saves + 1):
            state = jax.block_until_ready(nudge(state))
            t0 = time.perf_counter()
            ckpt.save(i, state, cfg.to_dict())
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            rss, peak = rss_mb()
            rows.append({"save": i, "blocking_s": t1 - t0, "total_s": t2 - t0, "rss_mb": rss})
            if args.verbose:
                print(json.dumps({**rows[-1], "peak_rss_mb": peak}), flush=True)
        on_disk = sum(f.stat().st_size for f in (work / "checkpoints" / str(i)).rglob("*"))
    finally:
        ckpt.close()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    blocking = [r["blocking_s"] for r in rows]
    total = [r["total_s"] for r in rows]
    rss = [r["rss_mb"] for r in rows]
    base = rss[min(4, len(rss) - 1)]  # after save 5: allocator pools and caches are warm
    summary = {
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "state_mb": tree_bytes(state) / 2**20,
        "on_disk_mb": on_disk / 2**20,
        "saves": len(rows),
        "blocking_s_first": blocking[0],
        "blocking_s_median": statistics.median(blocking[1:] or blocking),
        "blocking_s_max": max(blocking[1:] or blocking),
        "total_s_first": total[0],
        "total_s_median": statistics.median(total[1:] or total),
        "total_s_max": max(total[1:] or total),
        "rss_mb_before": start_rss,
        "rss_mb_after_1": rss[0],
        "rss_mb_after_5": base,
        "rss_mb_after_last": rss[-1],
        "rss_mb_max": max(rss),
        "rss_growth_mb": rss[-1] - base,
        "peak_rss_mb": rss_mb()[1],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
