"""Where a gptjax training step spends its time on this CPU: each piece jitted and timed alone.

Pieces at the config's shapes (one CPU device): the whole step; forward+backward of the blocks;
the output head + cross-entropy over the vocabulary (plain and chunked); causal attention; the
layer norms; the AdamW update; and a plain matmul as the FLOP/s yardstick. Times are medians in
ms; GFLOP/s where the piece's matmul FLOPs are well defined (forward+backward = 3x forward).

    python benchmarks/profile_pieces.py configs/cpu_small.yaml [key=value ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config
from gptjax.core import model, steps, vocab_loss
from gptjax.tools import bench


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of jitted `fn(*args)`, blocking on the result (compile excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = config.load(args.config, args.overrides)
    m, r = cfg.model, args.repeats
    B, T, D, N, H, F, V, L = (
        cfg.train.batch_size,
        m.seq_len,
        m.d_model,
        m.n_head,
        m.head_dim,
        m.ff,
        m.vocab_size,
        m.n_layer,
    )
    dt = jnp.dtype(m.dtype)
    setup = steps.build(cfg, jax.devices()[:1])
    state = steps.init_state(setup)
    params = state["params"]
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_rows(cfg, 0, 0, B).items()}
    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (B, T, D), dt)
    q, k, v = (jax.random.normal(kk, (B, T, N, H), dt) for kk in keys[1:])
    rows = {}

    def add(name, seconds, flops=None):
        rows[name] = {"ms": round(1e3 * seconds, 2)}
        if flops:
            rows[name]["gflop_s"] = round(flops / seconds / 1e9, 1)

    tok = B * T
    layer_flops = 2 * tok * (D * 3 * D + D * D + 2 * D * F) + 4 * B * N * T * T * H
    head_flops = 2 * tok * D * V

    step = steps.make_train_step(setup)
    with setup.activate():
        compiled = step.jitted.lower(state, batch).compile()
    fresh = lambda: jax.tree.map(jnp.copy, state)
    times = []
    for _ in range(r + 1):
        s = fresh()
        jax.block_until_ready(s)
        begin = time.perf_counter()
        jax.block_until_ready(compiled(s, batch))
        times.append(time.perf_counter() - begin)
    add("train_step", statistics.median(times[1:]), 3 * (L * layer_flops + head_flops))

    gpt_graph = setup.graphdef

    def blocks_loss(p):
        from flax import nnx

        return nnx.merge(gpt_graph, p).hidden(batch["inputs"]).astype(jnp.float32).sum()

    add(
        "blocks_fwd_bwd",
        timed(jax.jit(jax.grad(blocks_loss)), params, repeats=r),
        3 * L * layer_flops,
    )

    w = params["wte"]
    targets = batch["targets"]
    for chunk in (0, 64):
        if chunk >= T:
            continue
        f = jax.jit(
            jax.grad(lambda h, w, c=chunk: vocab_loss.token_losses(h, w, targets, c).mean(), (0, 1))
        )
        add(f"head_xent_fwd_bwd chunk={chunk}", timed(f, h, w, repeats=r), 3 * head_flops)

    impl = model.attention_impl(m.attention, dt)
    attn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl
    )
    attn_grad = jax.jit(
        jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    )
    add(
        f"attention_fwd_bwd x{L} ({impl})",
        L * timed(attn_grad, q, k, v, repeats=r),
        3 * L * 4 * B * N * T * T * H,
    )

    scale, bias = jnp.ones(D), jnp.zeros(D)
    ln = lambda x, s, b: model.norm(x, s, b, m).astype(jnp.float32).sum()
    ln_grad = jax.jit(jax.grad(ln, (0, 1, 2)))
    add(f"layer_norm_fwd_bwd x{2 * L + 1}", (2 * L + 1) * timed(ln_grad, h, scale, bias, repeats=r))

    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(lambda g, o, p: setup.optimizer.update(g, o, p))
    add("adamw_update", timed(update, grads, state["opt_state"], params, repeats=r))

    a = jnp.asarray(np.random.default_rng(0).standard_normal((tok, D)), dt)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((D, F)), dt)
    add(
        f"matmul [{tok},{D}]x[{D},{F}]",
        timed(jax.jit(jnp.matmul), a, b, repeats=r),
        2 * tok * D * F,
    )
    print(
        json.dumps({"config": args.config, "overrides": args.overrides, "pieces": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
