"""Preference objectives on pairs of replies (gptjax/data/prefs.py: row 2i is pair i's chosen
reply, row 2i+1 its rejected one).

A reply's log-probability is the sum of its tokens' log-probabilities under the model, over the
loss mask (the reply and its `<|end|>`):  log π(y|x) = -Σ_t mask_t · CE_t.

DPO (Rafailov et al. 2023, eq. 7), with a frozen reference π_ref and, per pair,

    h = β · ((log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)))
    loss = -(1 - ε) · log σ(h) - ε · log σ(-h)          (train.dpo_label_smoothing = ε)

the mean over the pairs of the global batch. With π = π_ref, h = 0 and the loss is ln 2.
`train.dpo_loss=ipo` (Azar et al. 2023, eq. 17) is (h/β - 1/(2β))² instead. The implicit rewards
β(log π - log π_ref) of the chosen and the rejected reply, their margin h and the accuracy
(h > 0) are logged.

The reference's log-probabilities are computed in the same jitted step: its parameters are a
step input sharded like the policy's (no optimiser state, never updated, never checkpointed),
one extra forward pass per step, no gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.core import sharding, steps

PAIR_STATS = ("reward_chosen", "reward_rejected", "margin", "accuracy")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["beta", "label_smoothing"], meta_fields=["loss"]
)
@dataclass(frozen=True)
class Settings:
    """β and ε may be traced (one compiled step for every value); the loss's kind is static."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss: str = "sigmoid"  # or "ipo"


def sequence_logps(graphdef, params, batch: dict, key=None, segments=False) -> jax.Array:
    """Each row's log-probability of its scored tokens: [B] f32."""
    losses = steps.token_losses(graphdef, params, batch, key, segments)
    return -(losses * batch["loss_mask"].astype(jnp.float32)).sum(axis=-1)


def pair_losses(policy_P2: jax.Array, reference_P2: jax.Array, s: Settings):
    """(loss per pair [P], margin h per pair [P], implicit rewards [P, 2]) from the reply
    log-probabilities [P, 2] (column 0 chosen, 1 rejected)."""
    rewards = s.beta * (policy_P2 - reference_P2)
    h = rewards[:, 0] - rewards[:, 1]
    if s.loss == "ipo":
        losses = (h / s.beta - 1.0 / (2.0 * s.beta)) ** 2
    else:
        eps = s.label_smoothing
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
    return losses, h, rewards


def _stat_sums(h, rewards) -> dict[str, jax.Array]:
    return {
        "reward_chosen": rewards[:, 0].sum(),
        "reward_rejected": rewards[:, 1].sum(),
        "margin": h.sum(),
        "accuracy": (h > 0).astype(jnp.float32).sum(),
    }


def split_pairs(batch: dict, micro_batches: int) -> dict:
    """[B, T] arrays -> [M, B/M, T], each micro-batch whole pairs: pair m, m+M, ... go to
    micro-batch m (as steps.loss_and_grads splits rows)."""

    def split(a):
        P = a.shape[0] // 2
        a = a.reshape(P // micro_batches, micro_batches, 2, *a.shape[1:]).swapaxes(0, 1)
        return a.reshape(micro_batches, 2 * (P // micro_batches), *a.shape[3:])

    return jax.tree.map(split, batch)


def dpo_loss_and_grads(
    graphdef,
    params,
    ref_params,
    batch: dict,
    micro_batches: int,
    s: Settings,
    key=None,
    segments=False,
):
    """(mean pair loss, its gradient, scored tokens, {stat: mean over pairs})."""
    pairs = batch["inputs"].shape[0] // 2
    count = batch["loss_mask"].astype(jnp.float32).sum()

    def loss_fn(params, micro, key):
        policy = sequence_logps(graphdef, params, micro, key, segments).reshape(-1, 2)
        reference = sequence_logps(graphdef, ref_params, micro, None, segments).reshape(-1, 2)
        losses, h, rewards = pair_losses(policy, jax.lax.stop_gradient(reference), s)
        return losses.sum() / pairs, _stat_sums(h, rewards)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss, sums), grads = grad_fn(params, batch, key)
    else:

        def accumulate(carry, xs):
            loss_sum, grad_sum, stat_sum = carry
            index, micro = xs
            micro = {k: sharding.constrain(v, ("batch", None)) for k, v in micro.items()}
            sub_key = None if key is None else jax.random.fold_in(key, index)
            (loss, sums), grads = grad_fn(params, micro, sub_key)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (loss_sum + loss, add(grad_sum, grads), add(stat_sum, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        no_stats = {name: jnp.zeros((), jnp.float32) for name in PAIR_STATS}
        (loss, grads, sums), _ = jax.lax.scan(
            accumulate,
            (jnp.zeros((), jnp.float32), zeros, no_stats),
            (jnp.arange(micro_batches), split_pairs(batch, micro_batches)),
        )
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, count, {name: v / pairs for name, v in sums.items()}


@dataclass
class DPO:
    """train.objective=dpo for steps.make_train_step: the reference's parameters are the
    step's extra input (`inputs`, sharded by `shardings`)."""

    setup: Any  # steps.Setup
    reference: Any  # the frozen parameters, on setup.param_shardings
    settings: Settings

    @property
    def inputs(self):
        return self.reference

    @property
    def shardings(self):
        return self.setup.param_shardings

    def loss_and_grads(self, params, batch, micro_batches, key, ref_params):
        segments = self.setup.cfg.data.packing == "segments"
        return dpo_loss_and_grads(
            self.setup.graphdef,
            params,
            ref_params,
            batch,
            micro_batches,
            self.settings,
            key,
            segments,
        )

    def make_eval(self):
        """jit(params, batch, valid pairs [P]) -> sums of the pair loss and PAIR_STATS over the
        valid pairs, and their count."""
        setup, s = self.setup, self.settings
        segments = setup.cfg.data.packing == "segments"

        def fn(params, ref_params, batch, valid):
            policy = sequence_logps(setup.graphdef, params, batch, None, segments).reshape(-1, 2)
            ref = sequence_logps(setup.graphdef, ref_params, batch, None, segments).reshape(-1, 2)
            losses, h, rewards = pair_losses(policy, ref, s)
            w = valid.astype(jnp.float32)
            sums = {"loss": (losses * w).sum(), "pairs": w.sum()}
            sums |= _stat_sums(h * w, rewards * w[:, None])
            sums["accuracy"] = ((h > 0) * w).sum()
            return sums

        jitted = jax.jit(
            fn,
            in_shardings=(
                setup.param_shardings,
                setup.param_shardings,
                setup.batch_shardings,
                None,
            ),
        )

        def run(params, batch, valid):
            with setup.activate():
                return jitted(params, self.reference, batch, valid)

        return run
