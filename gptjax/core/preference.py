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

A reward model (`train.objective=reward`) scores a reply with a scalar head on the final hidden
state of its last token (`reward_scores`) and is trained with the Bradley-Terry loss
-log σ(r_w - r_l).

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
from flax import nnx

from gptjax.core import steps

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


def _pair_loss_and_grads(loss_fn, params, batch: dict, micro_batches: int, key=None):
    """(mean pair loss, its gradient, scored tokens, {stat: mean over pairs}) of
    `loss_fn(params, micro, key) -> (sum of the micro-batch's pair losses, {stat: sum})`,
    micro-batches of whole pairs accumulated in one f32 buffer."""
    pairs = batch["inputs"].shape[0] // 2
    count = batch["loss_mask"].astype(jnp.float32).sum()
    grad_fn = jax.value_and_grad(lambda p, m, k: _scaled(loss_fn(p, m, k), pairs), has_aux=True)

    def value_and_grad(params, micro, key):
        (loss, sums), grads = grad_fn(params, micro, key)
        return loss, sums, grads

    no_stats = {name: jnp.zeros((), jnp.float32) for name in PAIR_STATS}
    loss, sums, grads = steps.over_micro_batches(
        value_and_grad, params, batch, micro_batches, key, split_pairs, no_stats
    )
    return loss, grads, count, {name: v / pairs for name, v in sums.items()}


def _scaled(loss_and_sums, pairs: int):
    loss_sum, sums = loss_and_sums
    return loss_sum / pairs, sums


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

    def loss_fn(params, micro, key):
        policy = sequence_logps(graphdef, params, micro, key, segments).reshape(-1, 2)
        reference = sequence_logps(graphdef, ref_params, micro, None, segments).reshape(-1, 2)
        losses, h, rewards = pair_losses(policy, jax.lax.stop_gradient(reference), s)
        return losses.sum(), _stat_sums(h, rewards)

    return _pair_loss_and_grads(loss_fn, params, batch, micro_batches, key)


# --- reward models ------------------------------------------------------------------------------


def reward_scores(graphdef, params, batch: dict, token: int, key=None, segments=False):
    """Each row's scalar reward [B] f32: the final hidden state at the reply's last token (the
    row's last scored position, whose target is the reply's `<|end|>`) times the output head's
    row of `token` (the run's end-of-document id: never a target inside a pair's rows, and as an
    input only in padding after the reply, which a causal model never reads back)."""
    gpt = nnx.merge(graphdef, params)
    positions = batch["positions"] if segments else None
    segment_ids = batch["segment_ids"] if segments else None
    h_BTD = gpt.hidden(batch["inputs"], key, positions_BT=positions, segment_ids_BT=segment_ids)
    mask = batch["loss_mask"]
    T = mask.shape[1]
    last_B = T - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
    return h_BD.astype(jnp.float32) @ gpt.head()[token].astype(jnp.float32)


def bradley_terry(scores_P2: jax.Array):
    """(loss per pair -log σ(r_w - r_l), margin r_w - r_l, the scores as the 'rewards')."""
    margin = scores_P2[:, 0] - scores_P2[:, 1]
    return -jax.nn.log_sigmoid(margin), margin, scores_P2


def reward_loss_and_grads(
    graphdef, params, batch: dict, micro_batches: int, token: int, key=None, segments=False
):
    """The Bradley-Terry loss of a reward model: (mean pair loss, gradient, scored tokens,
    {stat: mean over pairs}); `reward_chosen`/`reward_rejected` are the mean scores."""

    def loss_fn(params, micro, key):
        scores = reward_scores(graphdef, params, micro, token, key, segments).reshape(-1, 2)
        losses, margin, scores = bradley_terry(scores)
        return losses.sum(), _stat_sums(margin, scores)

    return _pair_loss_and_grads(loss_fn, params, batch, micro_batches, key)


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
        """jit(params, batch, valid pairs [P]) -> sums over the valid pairs of the pair loss,
        PAIR_STATS and the policy's own log-probability margin and accuracy, and their count."""
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
            # the policy's own preference, no reference: log pi(chosen) - log pi(rejected)
            own = policy[:, 0] - policy[:, 1]
            sums["logp_margin"] = (own * w).sum()
            sums["logp_accuracy"] = ((own > 0) * w).sum()
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


@dataclass
class Reward:
    """train.objective=reward for steps.make_train_step: no extra inputs."""

    setup: Any  # steps.Setup
    token: int  # the head row that scores (the end-of-document id)
    inputs: Any = None
    shardings: Any = None

    def loss_and_grads(self, params, batch, micro_batches, key, _inputs):
        segments = self.setup.cfg.data.packing == "segments"
        return reward_loss_and_grads(
            self.setup.graphdef, params, batch, micro_batches, self.token, key, segments
        )

    def make_eval(self):
        """jit(params, batch, valid pairs [P]) -> sums over the valid pairs (see DPO)."""
        setup, token = self.setup, self.token
        segments = setup.cfg.data.packing == "segments"

        def fn(params, batch, valid):
            scores = reward_scores(setup.graphdef, params, batch, token, None, segments)
            losses, margin, scores = bradley_terry(scores.reshape(-1, 2))
            w = valid.astype(jnp.float32)
            sums = {"loss": (losses * w).sum(), "pairs": w.sum()}
            sums |= _stat_sums(margin * w, scores * w[:, None])
            sums["accuracy"] = ((margin > 0) * w).sum()
            return sums

        jitted = jax.jit(fn, in_shardings=(setup.param_shardings, setup.batch_shardings, None))

        def run(params, batch, valid):
            with setup.activate():
                return jitted(params, batch, valid)

        return run

    def make_scores(self):
        """jit(params, batch) -> each row's reward [B] (`gptjax score`, best-of-n)."""
        setup, token = self.setup, self.token
        segments = setup.cfg.data.packing == "segments"
        fn = lambda params, batch: reward_scores(
            setup.graphdef, params, batch, token, None, segments
        )
        jitted = jax.jit(fn, in_shardings=(setup.param_shardings, setup.batch_shardings))

        def run(params, batch):
            with setup.activate():
                return jitted(params, batch)

        return run
