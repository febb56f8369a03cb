"""AdamW with warmup + cosine (or WSD, or constant) schedule, global-norm clipping, and weight
decay on the parameters that declare it (`decay=` where each is defined, gptjax/model.py)."""

from __future__ import annotations

from typing import Any

import optax

from gptjax.config import OptimConfig


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


def make(cfg: OptimConfig, total_steps: int, decay_mask: Any) -> optax.GradientTransformation:
    """The optimiser; `decay_mask` is a tree like the parameters, True where AdamW decays
    (`model.declared(abstract_state, "decay")`)."""
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
