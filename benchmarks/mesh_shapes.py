"""Step time and tokens/s of one config on each mesh shape, on 8 fake CPU devices.

    python benchmarks/mesh_shapes.py [CONFIG] [key=value ...] [--steps N --warmup N]

Prints one JSON line per mesh and a Markdown table. All fake CPU devices share this machine's
cores, so the numbers compare the cost of each layout's collectives and resharding on CPU; they
say little about GPUs or TPUs, where each device has its own compute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX backend starts
jax.config.update("jax_platforms", "cpu")

from gptjax import config  # noqa: E402
from gptjax.tools import bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (2, 4, 1)]
# cpu_small with 8 heads of 32, so that tensor=8 divides heads, d_ff and vocab.
DEFAULT = [str(ROOT / "configs/cpu_small.yaml"), "model.n_head=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=DEFAULT[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    overrides = args.overrides or ([DEFAULT[1]] if args.config == DEFAULT[0] else [])
    rows = []
    for data, fsdp, tensor in MESHES:
        mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
        cfg = config.load(args.config, [*overrides, *mesh, "run_dir=/tmp/gptjax-mesh-bench"])
        report = bench.run(cfg, timed=args.steps, warmup=args.warmup)
        print(json.dumps(report), flush=True)
        rows.append(((data, fsdp, tensor), report))
    print("\n| mesh (data, fsdp, tensor) | compile s | step ms (median) | tokens/s | loss |")
    print("|---|---|---|---|---|")
    for shape, r in rows:
        print(
            f"| {shape} | {r['compile_s']:.1f} | {1000 * r['step_time_median_s']:.0f} "
            f"| {r['tokens_per_s']:,.0f} | {r['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
