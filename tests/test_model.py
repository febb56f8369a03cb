"""The model against an independent float64 NumPy GPT-2, plus structure checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config
from gptjax.core import model


def small_cfg(**changes):
    values = dict(vocab_size=97, seq_len=16, n_layer=3, n_head=4, d_model=32, dtype="float32")
    values.update(changes)
    return config.ModelConfig(**values)


def numpy_gpt2(p, tokens):
    """GPT-2 forward in float64 NumPy, written from the paper/released code, not from model.py."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def layer_norm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    B, T = tokens.shape
    x = p["wte"][tokens] + p["wpe"][:T]
    blocks = p["blocks"]
    L, D, _, N, H = blocks["qkv_w"].shape
    causal = np.tril(np.ones((T, T), bool))
    for i in range(L):
        h = layer_norm(x, blocks["ln1_scale"][i], blocks["ln1_bias"][i])
        w = blocks["qkv_w"][i].reshape(D, 3 * N * H)
        qkv = h @ w + blocks["qkv_b"][i].reshape(-1)
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(B, T, N, H).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(H)
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        a = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, N * H)
        x = x + a @ blocks["out_w"][i].reshape(N * H, D) + blocks["out_b"][i]
        h = layer_norm(x, blocks["ln2_scale"][i], blocks["ln2_bias"][i])
        x = x + gelu(h @ blocks["fc_w"][i] + blocks["fc_b"][i]) @ blocks["proj_w"][i]
        x = x + blocks["proj_b"][i]
    x = layer_norm(x, p["ln_f_scale"], p["ln_f_bias"])
    return x @ p["wte"].T


def random_params(cfg, seed=0):
    """Trained-looking weights: every parameter random (incl. biases and LayerNorm gains)."""
    params = model.init_params(cfg, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_numpy_float64(scan_layers):
    cfg = small_cfg(scan_layers=scan_layers)
    graphdef, _ = model.abstract(cfg)
    params = random_params(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_len))
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens))
    expected = numpy_gpt2(params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
    cfg32, cfg16 = small_cfg(), small_cfg(dtype="bfloat16")
    params = random_params(cfg32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 16)))
    out32 = nnx.merge(model.abstract(cfg32)[0], params)(tokens)
    out16 = nnx.merge(model.abstract(cfg16)[0], params)(tokens)
    assert out16.dtype == jnp.float32  # logits stay f32
    assert float(jnp.abs(out32 - out16).max()) < 0.1 * float(jnp.abs(out32).max())


def test_causal_prefix_does_not_see_the_future():
    cfg = small_cfg()
    gpt = nnx.merge(model.abstract(cfg)[0], random_params(cfg))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (1, 16)))
    changed = tokens.at[0, 10:].set((tokens[0, 10:] + 1) % 97)
    np.testing.assert_array_equal(np.asarray(gpt(tokens)[0, :10]), np.asarray(gpt(changed)[0, :10]))


def test_gpt2_initialisation_and_axis_names():
    cfg = small_cfg(n_layer=8, d_model=64, n_head=4)
    params = model.init_params(cfg, 0)
    blocks = params["blocks"]
    assert np.std(np.asarray(params["wte"])) == pytest.approx(0.02, rel=0.05)
    assert np.std(np.asarray(blocks["fc_w"])) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert np.std(np.asarray(blocks["proj_w"])) == pytest.approx(residual, rel=0.05)
    assert np.std(np.asarray(blocks["out_w"])) == pytest.approx(residual, rel=0.05)
    assert np.all(np.asarray(blocks["ln1_scale"]) == 1) and np.all(np.asarray(blocks["fc_b"]) == 0)
    assert params["wte"].dtype == jnp.float32
    _, state = model.abstract(cfg)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    for path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ):
        assert all(name is not None for name in spec), f"unnamed axis in {path}"
    assert tuple(specs["blocks"]["qkv_w"]) == ("layers", "embed", "qkv", "heads", "head_dim")
    expected = 12 * cfg.n_layer * cfg.d_model**2 + cfg.vocab_size * cfg.d_model
    count = model.count_params(params)
    assert expected < count < expected * 1.1  # the 12·L·D² + V·D rule of thumb, plus biases/wpe


def test_untied_head_and_dropout_are_used():
    cfg = small_cfg(tie_embeddings=False, dropout=0.5)
    params = model.init_params(cfg, 0)
    assert params["lm_head"].shape == (cfg.d_model, cfg.vocab_size)
    gpt = nnx.merge(model.abstract(cfg)[0], params)
    tokens = jnp.zeros((1, 8), jnp.int32)
    a, b = gpt(tokens, jax.random.key(0)), gpt(tokens, jax.random.key(1))
    assert not np.allclose(np.asarray(a), np.asarray(b))  # dropout active with a key
    np.testing.assert_array_equal(np.asarray(gpt(tokens)), np.asarray(gpt(tokens)))
