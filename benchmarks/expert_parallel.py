"""MoE train-step time on 8 fake CPU devices: experts split over mesh.expert (all-to-all
dispatch) against every device holding every expert, measured interleaved.

    python benchmarks/expert_parallel.py [key=value ...] [--rounds N]

Contenders (one train step each, compiled ahead of time, timed in turn every round):
- replicated-gspmd: mesh.data=8, experts replicated, moe.experts_local on the global tokens
  (XLA's partitioner places the sort and the scatter; what the model would run if
  expert_parallel.active() were false)
- replicated-shard_map: mesh.data=8, experts replicated, each device its own tokens inside
  shard_map (experts_sharded with no expert axis: no all-to-all; what the model runs)
- a2a-expert8: mesh.expert=8, each device one expert, two all-to-alls per MoE layer forward
- a2a-data2-expert4: mesh.data=2 mesh.expert=4

Prints one JSON line per contender (median and quartiles of the step time, the ratio to
replicated-shard_map, the all-to-all bytes per device per step) and a Markdown table. Every fake
device shares this machine's cores and memory: an all-to-all is a memory copy, so the times
compare compute and copy overheads, never a network.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX backend starts
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402

from gptjax import config  # noqa: E402
from gptjax.core import expert_parallel, model, moe, steps  # noqa: E402
from gptjax.data.batching import from_windows  # noqa: E402
from gptjax.tools import plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# debug_moe with 8 experts of width 256, d_model 128, 16 rows of 128 tokens, f32
BASE = [
    "model.moe.experts=8",
    "model.d_model=128",
    "model.d_ff=256",
    "model.seq_len=128",
    "train.batch_size=16",
    "model.dtype=float32",
    "run_dir=/tmp/gptjax-moeep-bench",
]
CONTENDERS = {
    "replicated-gspmd": (["mesh.data=8"], False),
    "replicated-shard_map": (["mesh.data=8"], True),
    "a2a-expert8": (["mesh.data=1", "mesh.expert=8"], True),
    "a2a-data2-expert4": (["mesh.data=2", "mesh.expert=4"], True),
}


def numpy_state(setup, seed=0):
    rng = np.random.default_rng(seed)
    shapes = model.param_shapes(setup.cfg.model)
    flat = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: flat[model.param_name(path)], setup.abstract_params
    )
    return steps.fresh_state(setup, params)


def a2a_bytes(cfg, mesh_shape) -> int:
    """Bytes one device sends by all-to-all per train step (forward 2, backward 2 per layer)."""
    S = mesh_shape.get("expert", 1)
    if S == 1:
        return 0
    batch_shards = math.prod(mesh_shape[a] for a in ("data", "fsdp", "expert"))
    m = cfg.model
    tokens = cfg.train.batch_size * m.seq_len // batch_shards
    A = tokens * m.moe.top_k
    cap = moe.capacity(cfg.train.batch_size * m.seq_len, m)
    C = A if cap is None else min(A, m.moe.experts // S * cap)
    itemsize = 4 if m.dtype == "float32" else 2
    rows = S * C * (S - 1) // S  # what leaves the device
    return 4 * sum(m.moe_layers()) * rows * (m.d_model * itemsize + 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    plain_active = expert_parallel.active
    runs = {}
    for name, (mesh, shard_mapped) in CONTENDERS.items():
        cfg = config.load(ROOT / "configs/debug_moe.yaml", [*BASE, *args.overrides, *mesh])
        expert_parallel.active = plain_active if shard_mapped else (lambda: False)
        setup = steps.build(cfg, jax.devices()[:8])
        state = numpy_state(setup)
        start = time.perf_counter()
        step = plan.compile_step(setup)  # traced now, with this contender's dispatch
        compile_s = time.perf_counter() - start
        rng = np.random.default_rng(1)
        shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
        windows = rng.integers(0, cfg.model.vocab_size, shape)
        batch = jax.device_put(from_windows(windows.astype(np.int32), 0), setup.batch_shardings)
        runs[name] = dict(cfg=cfg, setup=setup, state=state, step=step, batch=batch,
                          compile_s=compile_s, times=[], loss=None)  # fmt: skip
    expert_parallel.active = plain_active
    for r in range(args.warmup + args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], stats = run["step"](run["state"], run["batch"])
            loss = float(stats["loss"])  # waits for the step
            if r >= args.warmup:
                run["times"].append(time.perf_counter() - start)
            run["loss"] = loss
    base = statistics.median(runs["replicated-shard_map"]["times"])
    rows = []
    for name, run in runs.items():
        t = sorted(run["times"])
        q = statistics.quantiles(t, n=4)
        report = {
            "contender": name,
            "mesh": dict(run["setup"].mesh.shape),
            "compile_s": round(run["compile_s"], 1),
            "step_ms_median": round(1000 * statistics.median(t), 1),
            "step_ms_q1_q3": [round(1000 * q[0], 1), round(1000 * q[2], 1)],
            "ratio_to_replicated_shard_map": round(statistics.median(t) / base, 3),
            "a2a_MiB_per_device_per_step": round(
                a2a_bytes(run["cfg"], dict(run["setup"].mesh.shape)) / 2**20, 2
            ),
            "loss_after": run["loss"],
        }
        print(json.dumps(report), flush=True)
        rows.append(report)
    print("\n| contender | compile s | step ms (median, q1-q3) | ratio | all-to-all MiB/dev/step")
    print("|---|---|---|---|---|")
    for r in rows:
        q1, q3 = r["step_ms_q1_q3"]
        print(
            f"| {r['contender']} | {r['compile_s']} "
            f"| {r['step_ms_median']:.0f} ({q1:.0f}-{q3:.0f}) "
            f"| {r['ratio_to_replicated_shard_map']:.2f} | {r['a2a_MiB_per_device_per_step']} |"
        )


if __name__ == "__main__":
    main()
