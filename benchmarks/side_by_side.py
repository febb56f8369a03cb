"""gptjax vs the same GPT in PyTorch on this CPU, measured side by side.

Each round runs, one after another in fresh processes, `gptjax bench` (one CPU device, all cores)
and benchmarks/torch_gpt.py (same config, same synthetic batches, as many threads as cores),
in f32 and optionally PyTorch bf16 autocast. Rounds interleave the contenders so a busy machine
slows them alike; the ratio is taken within each round, then the median over rounds.

    python benchmarks/side_by_side.py configs/cpu_small.yaml --rounds 3 --steps 10 --warmup 3
    python benchmarks/side_by_side.py configs/cpu_small.yaml --torch-bf16 model.n_layer=2
    python benchmarks/side_by_side.py configs/cpu_small.yaml \
        --gptjax-variant noremat=model.remat=none --rounds 3 --steps 8

Prints each run's JSON line to stderr and one summary JSON line to stdout.
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


def run_json(command: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"side_by_side: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][-1]
    print(line, file=sys.stderr, flush=True)
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--torch-bf16", action="store_true", help="also PyTorch bf16 autocast")
    parser.add_argument(
        "--gptjax-variant",
        action="append",
        default=[],
        help="NAME=OVERRIDES: one more gptjax contender, e.g. noremat='model.remat=none'",
    )
    args = parser.parse_intermixed_args()

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)  # one CPU device
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    contenders = {
        "gptjax_f32": [sys.executable, "-m", "gptjax", "bench", args.config, *args.overrides]
        + ["model.dtype=float32", *timing],
        "torch_f32": [sys.executable, "benchmarks/torch_gpt.py", args.config, *args.overrides]
        + ["model.dtype=float32", "--threads", str(args.threads), *timing],
    }
    for item in args.gptjax_variant:
        name, _, overrides = item.partition("=")
        contenders[f"gptjax_f32_{name}"] = [*contenders["gptjax_f32"], *overrides.split()]
    if args.torch_bf16:
        contenders["torch_bf16"] = [*contenders["torch_f32"], "--dtype", "bfloat16"]

    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, command in contenders.items():
            rates[name].append(run_json(command, env)["tokens_per_s"])
    ratios = [j / t for j, t in zip(rates["gptjax_f32"], rates["torch_f32"], strict=True)]
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "threads": args.threads,
        "tokens_per_s_median": {k: statistics.median(v) for k, v in rates.items()},
        "tokens_per_s_each_round": rates,
        "gptjax_f32_over_torch_f32_per_round": ratios,
        "gptjax_f32_over_torch_f32": statistics.median(ratios),
    }
    for name in rates:
        if name.startswith("gptjax_f32_"):
            summary[f"{name}_over_torch_f32"] = statistics.median(
                j / t for j, t in zip(rates[name], rates["torch_f32"], strict=True)
            )
    if args.torch_bf16:
        summary["gptjax_f32_over_torch_bf16"] = statistics.median(
            j / t for j, t in zip(rates["gptjax_f32"], rates["torch_bf16"], strict=True)
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
