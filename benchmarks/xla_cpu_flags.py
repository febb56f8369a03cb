"""Which XLA:CPU flags speed up a gptjax training step here: `gptjax bench` under each XLA_FLAGS.

Flag sets run in fresh processes (XLA reads its flags once), interleaved over rounds so a busy
machine slows them alike; each set's speed is reported as a ratio to the default flags measured
in the same round, then the median over rounds.

    python benchmarks/xla_cpu_flags.py configs/quickstart.yaml --rounds 2 --steps 4
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

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_dot_eltwise_reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sets", default=",".join(FLAG_SETS), help="comma-separated names")
    args = parser.parse_args()
    names = args.sets.split(",")
    if "default" not in names:
        names.insert(0, "default")
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FLAG_SETS[name]}
            command = [sys.executable, "-m", "gptjax", "bench", args.config, *args.overrides]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            if result.returncode != 0:
                print(f"{name}: failed: {result.stderr.strip()[-300:]}", file=sys.stderr)
                rates[name].append(float("nan"))
                continue
            report = json.loads(result.stdout.strip().splitlines()[-1])
            rates[name].append(report["tokens_per_s"])
            print(f"{name}: {report['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    base = rates["default"]
    summary = {
        name: {
            "flags": FLAG_SETS[name],
            "tokens_per_s_each_round": values,
            "vs_default": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
        for name, values in rates.items()
    }
    print(json.dumps({"config": args.config, "overrides": args.overrides, "sets": summary}))


if __name__ == "__main__":
    main()
