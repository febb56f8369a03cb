"""Step time of a mixture of experts against dense models at equal active FLOPs, interleaved.

    python benchmarks/moe_vs_dense.py [--config configs/quickstart.yaml] [--rounds 8]
                                      [--steps 5]

The contenders (docs/models.md "Mixture of experts: measured"), each the quickstart's model
with its MLP swapped, all with the same active MLP parameters per token (±1%):

- dense_gelu: the quickstart itself (GELU MLP 4·d = 512 wide: 2·128·512 = 131,072 per layer)
- dense_swiglu: a SwiGLU MLP 336 wide (3·128·336 = 129,024)
- moe8x2: 8 SwiGLU experts 168 wide, top-2, dropless (2·3·128·168 + the router 128·8 = 130,048)
- moe8x2_capacity: the same with capacity_factor 1.25 (an [E, C, D] buffer, one batched matmul)

All three train steps are compiled in one process, then run in turns: `--rounds` rounds of
`--steps` steps of each, the same random batch. Prints one JSON object: each contender's median
seconds per step and its ratio to dense_gelu (the machine may be shared: interleaving makes the
ratios fair, the absolute times are not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from gptjax import config
from gptjax.core import flops, steps

CONTENDERS = {
    "dense_gelu": [],
    "dense_swiglu": ["model.mlp=swiglu", "model.d_ff=336"],
    "moe8x2": ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.d_ff=168"],
    "moe8x2_capacity": ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.d_ff=168",
                        "model.moe.capacity_factor=1.25"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    runs = {}
    for name, overrides in CONTENDERS.items():
        cfg = config.load(args.config, overrides)
        setup = steps.build(cfg, jax.devices()[:1])
        B, T = cfg.train.batch_size, cfg.model.seq_len
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1))
        batch = {
            "inputs": tokens[:, :-1].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32),
        }
        state = steps.init_state(setup)
        step = steps.make_train_step(setup)
        state, _ = jax.block_until_ready(step(state, batch))  # compile
        counts = flops.param_counts(cfg.model)
        runs[name] = {
            "step": step,
            "state": state,
            "batch": batch,
            "times": [],
            "params": counts["params"],
            "active_params": counts["active_params"],
            "flops_per_token": flops.flops_per_token(cfg.model),
        }
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], stats = run["step"](run["state"], run["batch"])
            jax.block_until_ready(stats)
            run["times"].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(runs["dense_gelu"]["times"])
    report = {
        name: {
            "seconds_per_step": statistics.median(run["times"]),
            "ratio_to_dense_gelu": statistics.median(run["times"]) / base,
            "params": run["params"],
            "active_params": run["active_params"],
            "flops_per_token": run["flops_per_token"],
        }
        for name, run in runs.items()
    }
    report["cpu"] = flops.cpu_machine()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
