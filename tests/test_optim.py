"""Schedule values, the weight-decay mask, and gradient accumulation inside the train step."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from gptjax import config, model, optim, steps
from gptjax.data.batch import from_windows


def test_warmup_then_cosine_to_min_lr():
    cfg = config.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lr = optim.schedule(cfg, 110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half way down the cosine
    assert float(lr(110)) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays():
    cfg = config.OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    lr = optim.schedule(cfg, 100)
    assert float(lr(10)) == pytest.approx(1.0) and float(lr(79)) == pytest.approx(1.0)
    assert float(lr(90)) == pytest.approx(0.55) and float(lr(100)) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    cfg = config.ModelConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=16)
    mask = model.declared(model.abstract(cfg)[1], "decay")
    assert mask["wte"] and mask["wpe"] and mask["blocks"]["qkv_w"] and mask["blocks"]["proj_w"]
    assert not mask["blocks"]["ln1_scale"]  # 2-D once stacked: a by-ndim mask would decay it
    assert not mask["blocks"]["fc_b"] and not mask["ln_f_bias"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir)
    graphdef, _ = model.abstract(cfg.model)
    params = model.init_params(cfg.model, 0)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1)).astype(np.int32)
    batch = from_windows(windows, eod_id=0)
    grads = jax.jit(steps.loss_and_grads, static_argnums=(0, 3))
    loss1, grads1, _ = grads(graphdef, params, batch, 1)
    loss4, grads4, _ = grads(graphdef, params, batch, 4)
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4), strict=True):
        # f32 sums in another order: relative 1e-5 of the largest gradient entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_train_step_with_micro_batches_updates_like_one_batch(tmp_path, cache_dir):
    base = tiny_config(tmp_path, cache_dir, "optim.warmup_steps=0")
    accumulated = base.model_copy(deep=True)
    accumulated.train.micro_batches = 4
    rng = np.random.default_rng(1)
    windows = rng.integers(0, base.model.vocab_size, (8, base.model.seq_len + 1)).astype(np.int32)
    batch = from_windows(windows, eod_id=0)
    results = []
    for cfg in (base, accumulated):
        setup = steps.build(cfg, jax.devices()[:1])
        state, stats = steps.make_train_step(setup)(steps.init_state(setup), batch)
        results.append((jax.device_get(state["params"]), {k: float(v) for k, v in stats.items()}))
    (params1, stats1), (params4, stats4) = results
    assert stats4["loss"] == pytest.approx(stats1["loss"], rel=1e-6)
    assert stats4["grad_norm"] == pytest.approx(stats1["grad_norm"], rel=1e-5)
    # Adam's first step moves each weight by lr·g/(|g| + eps), which amplifies f32 noise in a
    # tiny g by up to lr/eps; the bulk must agree tightly, a rare tiny-g weight to 1% of lr.
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-2 * base.optim.lr)
        assert np.mean(np.abs(a - b) <= 1e-4 * base.optim.lr) > 0.99
