"""int8 weights (gptjax/core/quantize.py): the rounding bound of one matmul, whole models of two
families against f32 and against the float weights the int8 ones stand for, and generation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config
from gptjax.config import ConfigError
from gptjax.core import model, quantize, steps
from gptjax.inference import generate
from gptjax.inference.settings import Sampling
from gptjax.training import runs
from tests.conftest import ROOT, run_cli


def test_one_matmul_is_within_the_derived_bound():
    """Each weight rounds by at most half its channel's scale, so each output of x · W is off by
    at most (scale_j / 2) · sum_i |x_i|; the values are int8 in [-127, 127] with one scale per
    output channel (max |w| / 127: each channel's largest weight is exact)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    w = (rng.normal(size=(64, 96)) * rng.uniform(0.01, 1.0, size=(1, 96))).astype(np.float32)
    q = quantize.quantize(w, (0,))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (1, 96)
    assert int(jnp.abs(q.values).max()) == 127
    np.testing.assert_allclose(q.scale, np.abs(w).max(0, keepdims=True) / 127, rtol=1e-6)
    dequantized = np.asarray(q.astype(jnp.float32))
    assert (np.abs(w - dequantized) <= np.asarray(q.scale) / 2 * (1 + 1e-6)).all()
    error = np.abs(x @ w - x @ dequantized)
    bound = quantize.matmul_error_bound(x, q, (0,))
    assert (error <= bound + 1e-5).all()
    assert error.max() > 0.02 * bound.max()  # the rounding is really there


def _random_params(cfg, seed=0):
    """NumPy-drawn parameters (weights std 0.1, norm scales 1 + noise) by the model's shapes."""
    rng = np.random.default_rng(seed)
    draw = lambda name, shape: np.asarray(
        (1.0 if "scale" in name else 0.0) + 0.1 * rng.normal(size=shape), np.float32
    )
    flat = {name: draw(name, shape) for name, shape in model.param_shapes(cfg).items()}
    tree = nnx.to_pure_dict(model.abstract(cfg)[1])
    return quantize._map_named(lambda name, _: jnp.asarray(flat[name]), tree)


@pytest.mark.parametrize("family", ["debug", "debug_llama"])
def test_int8_model_logits(family):
    """GPT-2's block (fused qkv, tied head) and Llama's (grouped q and kv, SwiGLU, an untied
    head): the int8 model's logits equal the f32 model's on the weights the int8 ones stand for
    (the dequantisation inside the forward is exactly values · scale), and are within 6% (RMS,
    relative) of the f32 model's own. The bound: a weight's rounding error is uniform in
    ±scale/2, scale = max|w|/127 ≈ 2.5σ/127 for a 64-wide Gaussian row, an RMS of 0.6% of the
    weights; about ten quantised matmuls on each path add up in quadrature to ≈ 2%; measured
    1.5% (GPT-2) and 3.3% (Llama, whose SwiGLU multiplies two rounded products), bound 6%."""
    cfg = config.load(ROOT / "configs" / f"{family}.yaml")
    setup = steps.build_model(cfg, jax.devices()[:1])
    params = _random_params(setup.model_cfg)
    qsetup, qparams = quantize.quantize_setup(setup, params, "int8")
    names = quantize.quantized_names(params)
    assert names == [n for n in model.param_shapes(setup.model_cfg) if n in quantize.CONTRACTED]
    assert quantize.nbytes(qparams) < 0.3 * quantize.nbytes(params)
    assert jax.tree.structure(qsetup.param_shardings) == jax.tree.structure(qparams)

    forward = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t))
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 32)).astype(np.int32)
    exact = np.asarray(forward(params, tokens))
    int8 = np.asarray(forward(qparams, tokens))
    stands_for = np.asarray(forward(quantize.dequantize_params(qparams), tokens))
    np.testing.assert_allclose(int8, stands_for, rtol=0, atol=1e-5)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
    assert rms(int8 - exact) / rms(exact) < 0.06
    assert rms(int8 - exact) > 0  # quantised for real


def test_int8_greedy_generation_is_that_of_the_weights_it_stands_for():
    """The cached prefill and decode (gptjax/inference/generate.py) on int8 weights give the
    greedy tokens of the same programs on the dequantised f32 weights."""
    cfg = config.load(ROOT / "configs" / "debug_llama.yaml")
    setup = steps.build_model(cfg, jax.devices()[:1])
    qsetup, qparams = quantize.quantize_setup(setup, _random_params(setup.model_cfg), "int8")
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    out = []
    for s, p in ((qsetup, qparams), (setup, quantize.dequantize_params(qparams))):
        rows = [[] for _ in prompts]
        for tokens, emitted, _ in generate.Generator(s, p, 8).stream(prompts, 12, Sampling(0.0)):
            for r in range(len(prompts)):
                rows[r] += tokens[r][emitted[r]].tolist()
        out.append(rows)
    assert out[0] == out[1] and len(out[0][1]) == 12


def test_an_unknown_quantisation_is_one_line():
    cfg = config.load(ROOT / "configs" / "debug.yaml")
    setup = steps.build_model(cfg, jax.devices()[:1])
    with pytest.raises(ConfigError, match="--quantize int4: use one of none, int8"):
        quantize.quantize_setup(setup, {}, "int4")


def test_eval_quantize_int8_scores_the_int8_model(chat_run):
    """`gptjax eval RUN --quantize int8` reaches the model: it prints the held-out score of the
    int8 weights (runs.score_held_out with quant=int8), which is not the f32 score but near it."""
    done = run_cli("eval", str(chat_run), "--batches", "1", "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    int8 = runs.score_held_out(chat_run, batches=1, quant="int8")
    f32 = runs.score_held_out(chat_run, batches=1)
    assert printed["eval_loss"] == pytest.approx(int8["eval_loss"], rel=1e-6)
    assert printed["eval_loss"] != f32["eval_loss"]
    assert printed["eval_loss"] == pytest.approx(f32["eval_loss"], rel=1e-2)
