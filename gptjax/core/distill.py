"""Knowledge distillation's loss: a frozen teacher's softened distribution as the target.

Per scored token, loss = α · T² · KL(p_teacher ‖ p_student) + (1 − α) · cross-entropy, with
p = softmax(logits / T) for both models at temperature T (Hinton et al. 2015: the T² keeps the
KL term's gradients on the cross-entropy's scale as T changes). The teacher runs in the same
jitted step, on the same mesh, in its own parameters (sharded by its own model config) and
without gradients; like the plain loss (gptjax/core/vocab_loss.py), `model.loss_chunk` > 0
computes both models' logits `chunk` positions at a time inside `jax.checkpoint`, so neither
[B, T, V] tensor is ever held. Teacher and student share the tokenizer; a padded table
(model.vocab_size past the tokenizer's pieces) is compared over the ids both have, padding at
-inf in both (it takes no probability).
Shapes: B batch, T sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.core import vocab_loss


class Teacher(NamedTuple):
    """The frozen teacher: its graph, its parameters (on the mesh; traced inside the step),
    their shardings, and the loss's settings (train.distill_alpha, train.distill_temperature)."""

    graphdef: Any
    params: Any
    shardings: Any
    alpha: float
    temperature: float


def kl(teacher_logits, student_logits, temperature: float) -> jax.Array:
    """KL(softmax(teacher / T) ‖ softmax(student / T)) over the last axis, in nats (f32); ids
    at -inf in the teacher take no probability."""
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    pt = jnp.exp(log_pt)
    return jnp.sum(pt * jnp.where(pt > 0, log_pt - log_ps, 0.0), axis=-1)


def combined(student_logits, teacher_logits, targets, alpha: float, temperature: float):
    """Per-token α · T² · KL(teacher ‖ student) + (1 − α) · cross-entropy [..] (f32)."""
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    soft = kl(teacher_logits[..., :V], student_logits[..., :V], temperature)
    hard = vocab_loss.cross_entropy(student_logits, targets)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def head_losses(
    h_BTD, w_VD, th_BTD, tw_VD, targets_BT, alpha: float, temperature: float, chunk: int = 0,
    vocab=None, teacher_vocab=None, softcap: float = 0.0, teacher_softcap: float = 0.0,
):  # fmt: skip
    """Per-token distillation losses [B, T] from the student's hidden states and head (h_BTD,
    w_VD) and the teacher's (th_BTD, tw_VD); `chunk` as for vocab_loss.token_losses."""
    B, T, _ = h_BTD.shape

    def losses(h, th, targets):
        student = vocab_loss.logits(h, w_VD, vocab, softcap)
        teacher = vocab_loss.logits(th, tw_VD, teacher_vocab, teacher_softcap)
        return combined(student, teacher, targets, alpha, temperature)

    if chunk <= 0 or chunk >= T:
        return losses(h_BTD, th_BTD, targets_BT)
    if T % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {T}")
    n = T // chunk
    per_chunk = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)
    xs = (per_chunk(h_BTD), per_chunk(jax.lax.stop_gradient(th_BTD)), per_chunk(targets_BT))
    one_chunk = jax.checkpoint(losses)
    _, losses_NBC = jax.lax.scan(lambda _, x: (None, one_chunk(*x)), None, xs)
    return losses_NBC.swapaxes(0, 1).reshape(B, T)


def token_losses_and_aux(graphdef, params, teacher: Teacher, batch: dict, key=None, segments=False):
    """(per-token distillation losses [B, T] of the student (graphdef, params) on a batch, the
    student's MoE figures: {} for a dense model); the teacher sees the same tokens, positions
    and segments (no dropout)."""
    student, frozen = nnx.merge(graphdef, params), nnx.merge(teacher.graphdef, teacher.params)
    where = {
        "positions_BT": batch["positions"] if segments else None,
        "segment_ids_BT": batch["segment_ids"] if segments else None,
    }
    h, aux = student.hidden_and_aux(batch["inputs"], key, **where)
    th = jax.lax.stop_gradient(frozen.hidden(batch["inputs"], None, **where))
    cfg, tcfg = student.cfg, frozen.cfg
    losses = head_losses(
        h, student.head(), th, frozen.head(), batch["targets"], teacher.alpha,
        teacher.temperature, cfg.loss_chunk, cfg.vocab, tcfg.vocab, cfg.logit_softcap,
        tcfg.logit_softcap,
    )  # fmt: skip
    return losses, aux
