"""AdamW with warmup + cosine (or WSD, or constant) schedule, global-norm clipping, and weight
decay only on matrices (chosen by parameter name, which stays right when layers are stacked)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gptjax.config import OptimConfig

# Parameter names that get weight decay: the embeddings and every matmul weight. Biases and
# LayerNorm scales/biases do not.
DECAYED = {"wte", "wpe", "lm_head", "qkv_w", "out_w", "fc_w", "proj_w"}


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate at each optimiser step: linear warmup from 0 to `lr`, then decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            cfg.lr, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio
        )
    else:  # wsd: warmup, stable at lr, then a linear decay over the last `decay_fraction`
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        stable = max(total_steps - warmup - decay_steps, 0)
        decay = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay_steps)],
            [stable],
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay, by the name of the leaf's key."""

    def decide(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name in DECAYED

    return jax.tree_util.tree_map_with_path(decide, params)


def make(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
