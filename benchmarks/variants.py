"""A/B speed of `gptjax bench` variants on this CPU: config overrides and/or XLA:CPU flags.

Each variant runs in a fresh process (XLA reads its flags once); variants are interleaved over
rounds, in rotated order, so a busy machine slows them alike. Each is reported relative to the
first variant measured in the same round (median over rounds), both as tokens/s (wall clock) and
as process CPU seconds per step (all threads), which is steadier than wall time when other work
shares the cores. A variant is NAME=SPEC; SPEC's words starting with `--xla` go to XLA_FLAGS,
the rest are config overrides.

    python benchmarks/variants.py configs/cpu_small.yaml --rounds 3 --steps 3 \\
        base= unrolled=model.scan_layers=false chunked=model.loss_chunk=64
    python benchmarks/variants.py configs/cpu_small.yaml --xla-flag-sets   # the flag sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

XLA_FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def run_variant(config: str, common: list[str], spec: str, steps: int, warmup: int) -> dict:
    words = spec.split()
    flags = " ".join(w for w in words if w.startswith("--xla"))
    overrides = [w for w in words if not w.startswith("--xla")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    command = [sys.executable, "-m", "gptjax", "bench", config, *common, *overrides]
    command += ["--steps", str(steps), "--warmup", str(warmup)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-300:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("variants", nargs="*", help="NAME=SPEC; the first is the baseline")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--xla-flag-sets", action="store_true", help="sweep XLA_FLAG_SETS")
    args = parser.parse_intermixed_args()
    variants = dict(XLA_FLAG_SETS) if args.xla_flag_sets else {}
    for item in args.variants:
        name, _, spec = item.partition("=")
        variants[name] = spec
    if not variants:
        parser.error("give variants NAME=SPEC or --xla-flag-sets")
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # rotate the order: no variant always runs first
        for name in names[shift:] + names[:shift]:
            report = run_variant(args.config, args.common, variants[name], args.steps, args.warmup)
            if "error" in report:
                print(f"{name}: failed: {report['error']}", file=sys.stderr, flush=True)
                wall[name].append(float("nan"))
                cpu[name].append(float("nan"))
                continue
            wall[name].append(report["tokens_per_s"])
            cpu[name].append(report["process_cpu_s_per_step"])
            print(
                f"{name}: {report['tokens_per_s']:.0f} tokens/s, "
                f"{report['process_cpu_s_per_step']:.3f} CPU s/step, "
                f"compile {report['compile_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    base = names[0]
    summary = {
        name: {
            "spec": variants[name],
            "tokens_per_s_each_round": wall[name],
            "cpu_s_per_step_each_round": cpu[name],
            "speed_vs_base": statistics.median(
                w / b for w, b in zip(wall[name], wall[base], strict=True)
            ),
            "cpu_time_vs_base": statistics.median(
                c / b for c, b in zip(cpu[name], cpu[base], strict=True)
            ),
        }
        for name in names
    }
    print(json.dumps({"config": args.config, "common": args.common, "variants": summary}))


if __name__ == "__main__":
    main()
