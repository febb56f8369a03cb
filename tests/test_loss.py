"""Chunked cross-entropy: same values and gradients as the plain one, without [B, T, V] logits."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from gptjax import config
from gptjax.core import steps, vocab_loss
from gptjax.data.batching import from_windows


def _inputs(B=2, T=16, D=8, V=40, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k1, (B, T, D), jnp.float32)
    w = 0.5 * jax.random.normal(k2, (V, D), jnp.float32)
    targets = jax.random.randint(k3, (B, T), 0, V)
    return h, w, targets


def test_plain_matches_numpy_oracle():
    h, w, targets = _inputs()
    logits = np.einsum("btd,vd->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    expected = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        vocab_loss.token_losses(h, w, targets), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("chunk", [0, 4])
def test_softcapped_loss_matches_numpy_formula(chunk):
    """model.logit_softcap: the cross-entropy of c * tanh(logits / c), plain and chunked."""
    h, w, targets = _inputs()
    w = 4.0 * w  # logits of a few units: a cap of 2 bends most of them
    c = 2.0
    logits = np.einsum("btd,vd->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    capped = c * np.tanh(logits / c)
    lse = np.log(np.exp(capped).sum(-1))
    expected = lse - np.take_along_axis(capped, np.asarray(targets)[..., None], -1)[..., 0]
    got = jax.jit(vocab_loss.token_losses, static_argnums=(3, 4, 5))(h, w, targets, chunk, None, c)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - vocab_loss.token_losses(h, w, targets)).max() > 0.1  # the cap mattered


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_chunked_equals_plain_value_and_gradient(chunk):
    h, w, targets = _inputs()
    weights = jax.random.uniform(jax.random.key(7), targets.shape)  # a non-uniform cotangent

    def objective(h, w, chunk):
        return (vocab_loss.token_losses(h, w, targets, chunk) * weights).sum()

    plain = jax.value_and_grad(objective, argnums=(0, 1))(h, w, 0)
    chunked = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2)(h, w, chunk)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-6)
    for got, want in zip(chunked[1], plain[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    per_token = vocab_loss.token_losses(h, w, targets, chunk)
    np.testing.assert_allclose(
        per_token, vocab_loss.token_losses(h, w, targets), rtol=1e-6, atol=1e-6
    )


def test_chunked_never_holds_full_logits():
    """No intermediate of the chunked loss's forward+backward has B*T*V elements."""
    B, T, D, V, chunk = 2, 64, 8, 96, 8
    h, w, targets = _inputs(B, T, D, V)

    def grads(chunk):
        return jax.grad(lambda h, w: vocab_loss.token_losses(h, w, targets, chunk).mean(), (0, 1))

    def biggest(chunk):
        jaxpr = jax.make_jaxpr(grads(chunk))(h, w)
        sizes = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return max(sizes)

    assert biggest(0) >= B * T * V
    assert biggest(chunk) <= B * chunk * V


def test_chunk_must_divide_seq_len(tmp_path, cache_dir):
    with pytest.raises(config.ConfigError, match="model.loss_chunk=48 does not divide"):
        tiny_config(tmp_path, cache_dir, "model.loss_chunk=48")


def test_train_step_same_loss_and_gradients_with_chunked_loss(tmp_path, cache_dir):
    """Through the model: steps.token_losses with loss_chunk=16 equals loss_chunk=0."""
    results = []
    for chunk in (0, 16):
        cfg = tiny_config(tmp_path, cache_dir, f"model.loss_chunk={chunk}")
        setup = steps.build(cfg, jax.devices()[:1])
        params = steps.init_state(setup)["params"]
        tokens = jax.random.randint(jax.random.key(1), (4, cfg.model.seq_len + 1), 0, 512)
        batch = from_windows(np.asarray(tokens), eod_id=0)
        f = lambda p, setup=setup, b=batch: steps.token_losses(setup.graphdef, p, b).mean()
        results.append(jax.jit(jax.value_and_grad(f))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
