"""AdamW with warmup + cosine (or WSD, or constant) schedule, global-norm clipping, and weight
decay on the parameters that declare it (`decay=` where each is defined, gptjax/core/model.py).

`optim.name=muon`: Muon (Keller Jordan's modded-nanogpt) on the hidden weight matrices (the
decayed, layer-stacked block weights), AdamW as above on everything else (embeddings, head,
norms, biases). Muon keeps a momentum m = mu·m + (1-mu)·g, takes u = (1-mu)·g + mu·m (Nesterov)
or m, orthogonalises each layer's matrix of u with 5 quintic Newton-Schulz steps (3.4445,
-4.7750, 2.0315) on u/|u|_F, scales it by sqrt(max(1, fan_out/fan_in)) and moves the weight by
-lr_muon(t)·(O + muon_weight_decay·w); lr_muon follows the same warmup and decay as lr.

The cosine reaches its floor (`lr * min_lr_ratio`) at the last step, or at `optim.decay_steps`
(or `optim.decay_tokens` / tokens per step) and stays there: GPT-3 decays over 260B tokens of a
300B-token run, then trains at 10% of the peak.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptjax.config import ConfigError, OptimConfig
from gptjax.core.model import param_name


def decay_end(cfg: OptimConfig, total_steps: int, tokens_per_step: int | None = None) -> int:
    """The step at which the cosine reaches its floor: `decay_steps`, `decay_tokens` rounded to
    whole steps of `tokens_per_step` (global batch x seq_len), else the last step."""
    if cfg.decay_tokens is None:
        return cfg.decay_steps or total_steps
    if not tokens_per_step:
        raise ConfigError("optim.decay_tokens needs the tokens per step (batch_size * seq_len)")
    steps = round(cfg.decay_tokens / tokens_per_step)
    if steps <= cfg.warmup_steps:
        raise ConfigError(
            f"optim.decay_tokens={cfg.decay_tokens} is {steps} steps of {tokens_per_step} tokens, "
            f"not more than optim.warmup_steps={cfg.warmup_steps}"
        )
    return steps


def schedule(
    cfg: OptimConfig,
    total_steps: int,
    tokens_per_step: int | None = None,
    peak: float | None = None,
) -> optax.Schedule:
    """Learning rate at each optimiser step: linear warmup from 0 to `peak` (default `lr`; Muon's
    matrices: `muon_lr`), then decay."""
    lr = cfg.lr if peak is None else peak
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":  # optax holds the floor after the decay steps
        decay_steps = decay_end(cfg, total_steps, tokens_per_step) - warmup
        decay = optax.cosine_decay_schedule(lr, max(decay_steps, 1), alpha=cfg.min_lr_ratio)
    else:  # wsd: warmup, stable at lr, then a linear decay over the last `decay_fraction`
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        stable = max(total_steps - warmup - decay_steps, 0)
        decay = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay_steps)],
            [stable],
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


# --- Muon ---------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero
# Axes that stack separate matrices: the scanned layers, q / k / v of a fused projection, and the
# experts of a mixture (expert_up_w [L, E, D, F]: L·E matrices D x F).
BATCH_AXES = ("layers", "qkv", "expert")


class View(NamedTuple):
    """How one stacked weight is seen as matrices: axes stacking separate matrices (vmapped),
    the matrix's input (rows) axes and output (columns) axes, as positions in the array."""

    batch: tuple[int, ...]
    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]


def matrix_view(names: tuple[str | None, ...]) -> View:
    """The 2-D view of a block weight from its logical axes: every weight is laid out
    [layers, inputs..., outputs...] (x @ W) with `embed` on one side, so the matrix splits at
    `embed`; `layers` and `qkv` stack separate matrices. qkv_w [L, D, 3, N, H]: 3L matrices
    D x (N·H) (q, k, v apart); out_w [L, N, H, D]: L matrices (N·H) x D; fc_w [L, D, F]: D x F;
    proj_w [L, F, D]: F x D."""
    batch = tuple(i for i, n in enumerate(names) if n in BATCH_AXES)
    rest = [i for i, n in enumerate(names) if n not in BATCH_AXES]
    if "embed" not in names or names.index("embed") == rest[0]:
        return View(batch, tuple(rest[:1]), tuple(rest[1:]))
    return View(batch, tuple(rest[:-1]), tuple(rest[-1:]))


def muon_views(decay_mask: Any, axes: Any) -> dict[str, View]:
    """{"blocks.qkv_w": View, ...}: the parameters Muon updates (decayed and stacked over
    layers: the hidden weight matrices; not the embeddings, head, norms or biases)."""
    is_axes = lambda x: isinstance(x, tuple)
    names = {
        param_name(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_axes)
    }
    decayed = {
        param_name(path): bool(d) for path, d in jax.tree_util.tree_leaves_with_path(decay_mask)
    }
    return {
        name: matrix_view(tuple(axes_))
        for name, axes_ in names.items()
        if decayed[name] and len(axes_) >= 3 and axes_[0] == "layers"
    }


def newton_schulz(x: jax.Array, steps: int) -> jax.Array:
    """An approximately orthogonal matrix (U S' V^T, S' ~ 0.7..1.2) of a 2-D `x` = U S V^T."""
    a, b, c = NS_COEFFS
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x  # X X^T on the short side
    x = x / (jnp.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def orthogonalise(u: jax.Array, view: View, steps: int) -> jax.Array:
    """Newton-Schulz on each matrix of `u` (f32), scaled by sqrt(max(1, fan_out / fan_in))."""
    order = view.batch + view.fan_in + view.fan_out
    moved = jnp.transpose(u.astype(jnp.float32), order)
    rows = math.prod(u.shape[i] for i in view.fan_in)
    cols = math.prod(u.shape[i] for i in view.fan_out)
    flat = moved.reshape(-1, rows, cols)
    out = jax.vmap(lambda m: newton_schulz(m, steps))(flat) * math.sqrt(max(1.0, cols / rows))
    return jnp.transpose(out.reshape(moved.shape), tuple(order.index(i) for i in range(u.ndim)))


class MuonState(NamedTuple):
    momentum: Any  # like the parameters Muon updates
    count: jax.Array  # steps taken, for the schedule


def muon(cfg: OptimConfig, lr: optax.Schedule, views: dict[str, View]):
    """Muon on the parameters named in `views` (the others are masked out by optax.partition)."""
    mu, steps = cfg.muon_momentum, cfg.muon_ns_steps

    def init(params):
        return MuonState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def update(grads, state, params):
        momentum = jax.tree.map(lambda m, g: mu * m + (1 - mu) * g, state.momentum, grads)
        nesterov = lambda m, g: (1 - mu) * g + mu * m
        u = jax.tree.map(nesterov, momentum, grads) if cfg.muon_nesterov else momentum
        rate = lr(state.count)

        def step(path, u_, w):
            o = orthogonalise(u_, views[param_name(path)], steps)
            return (-rate * (o + cfg.muon_weight_decay * w.astype(jnp.float32))).astype(w.dtype)

        updates = jax.tree_util.tree_map_with_path(step, u, params)
        return updates, MuonState(momentum, optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make(
    cfg: OptimConfig,
    total_steps: int,
    decay_mask: Any,
    tokens_per_step: int | None = None,
    axes: Any = None,
) -> optax.GradientTransformation:
    """The optimiser; `decay_mask` is a tree like the parameters, True where AdamW decays
    (`model.declared(abstract_state, "decay")`); `tokens_per_step` for optim.decay_tokens;
    `axes` the logical axes (`model.declared(abstract_state, "out_sharding")`), for Muon."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    adamw = optax.adamw(
        schedule(cfg, total_steps, tokens_per_step),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.name == "adamw":
        parts.append(adamw)
    else:
        if axes is None:
            raise ValueError("optim.name=muon needs the parameters' logical axes (axes=)")
        views = muon_views(decay_mask, axes)
        lr = schedule(cfg, total_steps, tokens_per_step, peak=cfg.muon_lr)
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if param_name(path) in views else "adamw", decay_mask
        )
        parts.append(optax.partition({"muon": muon(cfg, lr, views), "adamw": adamw}, labels))
    return optax.chain(*parts)
