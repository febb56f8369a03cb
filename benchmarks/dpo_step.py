"""What DPO's in-step reference costs: the DPO train step (policy forward + backward, and the
frozen reference's forward in the same jit) against the plain language-model step on the same
batch of pair rows, timed interleaved (median of N rounds, so machine load hits both alike),
and XLA's memory figures of both compiled steps (arguments: state + batch (+ reference); temp).

    python benchmarks/dpo_step.py configs/chat.yaml [key=value ...] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from gptjax import config
from gptjax.core import preference, steps
from gptjax.data import prefs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    cfg = config.load(args.config, [*args.overrides, "train.init_from=null"])
    setup = steps.build(cfg)
    B, T = cfg.train.batch_size, cfg.model.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    masks = np.zeros((B, T + 1), np.uint8)
    masks[:, T // 2 :] = 1  # replies: the second half of each row
    batch = jax.device_put(prefs.from_rows(tokens, masks), setup.batch_sharding)
    state = steps.init_state(setup)
    reference = jax.tree.map(lambda a: a.copy(), state["params"])
    dpo = preference.DPO(setup, reference, preference.Settings())
    fns = {"lm": steps.make_train_step(setup), "dpo": steps.make_train_step(setup, dpo)}
    memory, states, times = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        extra = () if name == "lm" else (reference,)
        with setup.activate():
            compiled = fn.jitted.lower(state, batch, *extra).compile()
        m = compiled.memory_analysis()
        memory[name] = {
            "argument_MB": round(m.argument_size_in_bytes / 2**20, 2),
            "temp_MB": round(m.temp_size_in_bytes / 2**20, 2),
        }
        states[name] = jax.tree.map(lambda a: a.copy(), state)
        states[name], _ = fn(states[name], batch)  # warm
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            states[name], stats = fn(states[name], batch)
            jax.block_until_ready(stats["loss"])
            times[name].append(time.perf_counter() - start)
    ms = {name: round(1e3 * float(np.median(t)), 1) for name, t in times.items()}
    params_mb = sum(a.nbytes for a in jax.tree.leaves(reference)) / 2**20
    print(
        json.dumps(
            {
                "rows": B,
                "seq_len": T,
                "devices": len(jax.devices()),
                "median_ms": ms,
                "dpo_over_lm": round(ms["dpo"] / ms["lm"], 3),
                "memory": memory,
                "reference_MB": round(params_mb, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
