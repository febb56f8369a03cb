"""AdamW with warmup + cosine (or WSD, or constant) schedule, global-norm clipping, and weight
decay on the parameters that declare it (`decay=` where each is defined, gptjax/core/model.py).

The cosine reaches its floor (`lr * min_lr_ratio`) at the last step, or at `optim.decay_steps`
(or `optim.decay_tokens` / tokens per step) and stays there: GPT-3 decays over 260B tokens of a
300B-token run, then trains at 10% of the peak.
"""

from __future__ import annotations

from typing import Any

import optax

from gptjax.config import ConfigError, OptimConfig


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
    cfg: OptimConfig, total_steps: int, tokens_per_step: int | None = None
) -> optax.Schedule:
    """Learning rate at each optimiser step: linear warmup from 0 to `lr`, then decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":  # optax holds the floor after the decay steps
        decay_steps = decay_end(cfg, total_steps, tokens_per_step) - warmup
        decay = optax.cosine_decay_schedule(cfg.lr, max(decay_steps, 1), alpha=cfg.min_lr_ratio)
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


def make(
    cfg: OptimConfig, total_steps: int, decay_mask: Any, tokens_per_step: int | None = None
) -> optax.GradientTransformation:
    """The optimiser; `decay_mask` is a tree like the parameters, True where AdamW decays
    (`model.declared(abstract_state, "decay")`); `tokens_per_step` for optim.decay_tokens."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule(cfg, total_steps, tokens_per_step),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
