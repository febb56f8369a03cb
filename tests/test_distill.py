"""Knowledge distillation (gptjax/core/distill.py, gptjax/training/teacher.py): the loss against
NumPy, a teacher equal to the student's starting point, and the one-line mistakes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.config import ConfigError
from gptjax.core import distill, model, steps
from gptjax.data import batching
from gptjax.training import teacher
from tests.conftest import tiny_config


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_the_loss_equals_numpy():
    """α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · cross-entropy per
    token, chunked over the sequence or not, with the last 3 of 40 ids padding (-inf in both:
    no probability), computed in float64 NumPy from the same hidden states and heads."""
    rng = np.random.default_rng(0)
    B, T, D, TD, V, vocab = 2, 8, 16, 24, 40, 37
    h, th = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, TD))
    w, tw = rng.normal(size=(V, D)), rng.normal(size=(V, TD))
    targets = rng.integers(0, vocab, (B, T))
    alpha, temperature = 0.3, 2.5
    z, tz = (h @ w.T)[..., :vocab], (th @ tw.T)[..., :vocab]
    log_ps, log_pt = _log_softmax(z / temperature), _log_softmax(tz / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    ce = -np.take_along_axis(_log_softmax(z), targets[..., None], -1)[..., 0]
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    args = (f32(h), f32(w), f32(th), f32(tw), jnp.asarray(targets, jnp.int32))
    for chunk in (0, 4):
        got = distill.head_losses(*args, alpha, temperature, chunk, vocab, vocab)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)
    got_kl = distill.kl(f32(tz), f32(z), temperature)
    np.testing.assert_allclose(np.asarray(got_kl), kl, rtol=1e-4, atol=1e-6)


def test_a_teacher_equal_to_the_students_start_gives_a_zero_first_loss(tmp_path):
    """α = 1 and the teacher the student's own initial parameters: the first step's loss is the
    KL of a distribution to itself: 0 up to float rounding (the teacher's and the student's
    forwards are the same computation in one program; asserted below 1e-6 nats)."""
    cfg = tiny_config(tmp_path, "unused", "model.loss_chunk=16", "train.batch_size=4")
    setup = steps.build(cfg, jax.devices()[:1])
    rng = np.random.default_rng(0)
    flat = {
        name: jnp.asarray((1.0 if "scale" in name else 0.0) + 0.1 * rng.normal(size=shape),
                          jnp.float32)
        for name, shape in model.param_shapes(setup.model_cfg).items()
    }  # fmt: skip
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: flat[model.param_name(path)],
        nnx.to_pure_dict(model.abstract(setup.model_cfg)[1]),
    )
    tokens = rng.integers(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1)).astype(np.int32)
    batch = {key: jnp.ones((4, cfg.model.seq_len), jnp.int32) for key in batching.KEYS}
    batch |= {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    own = distill.Teacher(setup.graphdef, params, setup.param_shardings, 1.0, 2.0)
    objective = teacher.Distill(setup, own)
    _, stats = steps.make_train_step(setup, objective)(steps.fresh_state(setup, params), batch)
    assert abs(float(stats["loss"])) < 1e-6


def test_a_teacher_with_another_tokenizer_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, "unused", f"train.distill_from={tmp_path}")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        teacher.source(cfg)

    class Piece:
        model_bytes = b"theirs"

    (tmp_path / "tokenizer.model").write_bytes(b"ours")
    assert teacher.source(cfg) == (tmp_path, None)
    with pytest.raises(ConfigError, match="the teacher's tokenizer .* is not the student's"):
        teacher.check_tokenizer(cfg, tmp_path, Piece())
