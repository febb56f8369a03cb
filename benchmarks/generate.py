"""Generation speed: the KV cache (gptjax/inference/generate.py) vs full recomputation.

Full recomputation is what `gptjax sample` did before the cache: for every new token one forward
over the fixed [B, seq_len] window (one compile), argmax at the last real position. Its cost
per token does not depend on how many tokens came before, so it is timed over
`--recompute-tokens` tokens per round; the cache generates all `--new` tokens. Rounds interleave
the contenders (a busy machine slows them alike); medians over rounds are reported. Random
weights, greedy decoding, no end-of-document stop: every row makes exactly `--new` tokens.

    python benchmarks/generate.py configs/cpu_small.yaml model.seq_len=1024 \\
        --prompt 256 --new 512 --batches 1,8 --rounds 3
    python benchmarks/generate.py configs/cpu_small.yaml model.seq_len=1024 --chunks 1,4,16,64 \\
        --batches 1 --no-recompute            # streaming granularity: tokens per device call

Prints a JSON line per measurement to stderr and a Markdown table to stdout. Speed-ups are
medians of the per-round ratios; CPU time per token (process time, all threads) is steadier
than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptjax import config  # noqa: E402
from gptjax.core import model, steps  # noqa: E402
from gptjax.inference import generate  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        lines = out.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if "Model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def cached(gen: generate.Generator, prompts, new: int) -> dict:
    """Time to first token and wall time for `new` tokens per row with the KV cache."""
    start, cpu = time.perf_counter(), time.process_time()
    first, made = None, 0
    for _, emitted, _ in gen.stream(prompts, new, generate.Sampling(0.0)):
        made += int(emitted.sum())
        if first is None and made:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    assert made == new * len(prompts), made
    cpu_ms = (time.process_time() - cpu) / made * 1e3
    return {"ttft_s": first, "total_s": total, "tokens_per_s": made / total, "cpu_ms": cpu_ms}


def make_recompute(setup: steps.Setup):
    graphdef = setup.graphdef

    @jax.jit
    def next_tokens(params, window_BT, last_B):
        logits = nnx.merge(graphdef, params)(window_BT)
        at = jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0]
        return jnp.argmax(at, axis=-1)

    return next_tokens


def recompute(next_tokens, params, prompts, tokens: int, seq_len: int) -> dict:
    """Per-token time of full recomputation over the [B, seq_len] window, blocking per token."""
    B = len(prompts)
    window = np.zeros((B, seq_len), np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        window[row, : len(prompt)] = prompt
    times, cpu = [], time.process_time()
    for _ in range(tokens):
        start = time.perf_counter()
        out = np.asarray(next_tokens(params, window, lengths - 1))
        times.append(time.perf_counter() - start)
        window[np.arange(B), lengths] = out
        lengths += 1
    step = statistics.median(times)
    cpu_ms = (time.process_time() - cpu) / (tokens * B) * 1e3
    return {"ttft_s": times[0], "step_s": step, "tokens_per_s": B / step, "cpu_ms": cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=512, help="new tokens per row")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--chunks", default="16", help="tokens per device call (cache)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recompute-tokens", type=int, default=8)
    parser.add_argument("--no-recompute", action="store_true")
    args = parser.parse_args()

    cfg = config.load(args.config, args.overrides)
    setup = steps.build_model(cfg, jax.devices()[:1])  # no optimiser: generation only
    params = jax.jit(model.init_params, static_argnums=(0, 1))(cfg.model, 0)
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    prompts = {b: rng.integers(2, cfg.model.vocab, (b, args.prompt)).tolist() for b in batches}
    next_tokens = make_recompute(setup)
    load = [os.getloadavg()[0]]

    # compile everything once before timing
    for b in batches:
        for c in chunks:
            cached(generate.Generator(setup, params, c), prompts[b], 2)
        if not args.no_recompute:
            recompute(next_tokens, params, prompts[b], 1, cfg.model.seq_len)

    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for b in batches:
            for c in chunks:
                got = cached(generate.Generator(setup, params, c), prompts[b], args.new)
                results.setdefault(("cache", b, c), []).append(got)
                print(json.dumps({"round": r, "mode": "cache", "batch": b, "chunk": c, **got}),
                      file=sys.stderr, flush=True)  # fmt: skip
            if not args.no_recompute:
                got = recompute(
                    next_tokens, params, prompts[b], args.recompute_tokens, cfg.model.seq_len
                )
                results.setdefault(("recompute", b, 0), []).append(got)
                print(json.dumps({"round": r, "mode": "recompute", "batch": b, **got}),
                      file=sys.stderr, flush=True)  # fmt: skip
        load.append(os.getloadavg()[0])

    med = lambda key, field: statistics.median(x[field] for x in results[key])
    m = cfg.model
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, load average {min(load):.1f}-{max(load):.1f}; "
        f"{m.n_layer} layers, d_model {m.d_model}, vocab {m.vocab_size}, seq_len {m.seq_len}, "
        f"{m.dtype}; prompt {args.prompt}, {args.new} new tokens, greedy; "
        f"median of {args.rounds} rounds\n"
    )
    print("| batch | method | tokens/s | CPU time per token | time to first token "
          "| speed-up (wall) | speed-up (CPU time) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")

    def ratio(key, base, field, invert=False):
        pairs = zip(results[key], results[base], strict=True)
        values = [(y[field] / x[field]) if invert else (x[field] / y[field]) for x, y in pairs]
        return f"{statistics.median(values):.0f}×"

    for b in batches:
        base = ("recompute", b, 0)
        for c in chunks:
            key = ("cache", b, c)
            wall = cpu = "—"
            if not args.no_recompute:
                wall = ratio(key, base, "tokens_per_s")
                cpu = ratio(key, base, "cpu_ms", invert=True)
            print(f"| {b} | KV cache, {c} tokens per call | {med(key, 'tokens_per_s'):,.0f} | "
                  f"{med(key, 'cpu_ms'):,.2f} ms | {med(key, 'ttft_s') * 1e3:,.0f} ms | "
                  f"{wall} | {cpu} |")  # fmt: skip
        if not args.no_recompute:
            print(f"| {b} | full recompute | {med(base, 'tokens_per_s'):,.1f} | "
                  f"{med(base, 'cpu_ms'):,.0f} ms | {med(base, 'ttft_s') * 1e3:,.0f} ms "
                  "| 1× | 1× |")  # fmt: skip


if __name__ == "__main__":
    main()
