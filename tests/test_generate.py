"""Sampling filters against hand-computed sets, and sampling that respects them."""

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.generate import filter_logits

LOGITS = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.3, 0.15, 9.0]))  # the last id is past the vocab


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


def test_top_k_keeps_the_k_largest_within_the_vocabulary():
    assert kept(filter_logits(LOGITS, 1.0, 2, 1.0, vocab=5)) == {1, 3}
    assert kept(filter_logits(LOGITS, 1.0, 0, 1.0, vocab=5)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities (vocab 5): 0.4, 0.3, 0.15, 0.1, 0.05 -> 0.4 + 0.3 = 0.7 reaches 0.6
    assert kept(filter_logits(LOGITS, 1.0, 0, 0.6, vocab=5)) == {1, 3}
    assert kept(filter_logits(LOGITS, 1.0, 0, 0.8, vocab=5)) == {1, 3, 4}


def test_temperature_scales_and_samples_stay_in_the_kept_set():
    scaled = filter_logits(LOGITS, 0.5, 0, 1.0, vocab=5)
    np.testing.assert_allclose(np.asarray(scaled[:5]), np.asarray(LOGITS[:5]) / 0.5, rtol=1e-6)
    filtered = filter_logits(LOGITS, 1.0, 3, 1.0, vocab=5)
    keys = jax.random.split(jax.random.key(0), 500)
    draws = jax.vmap(lambda k: jax.random.categorical(k, filtered))(keys)
    assert set(np.asarray(draws).tolist()) == {1, 3, 4}
