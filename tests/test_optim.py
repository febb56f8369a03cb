"""Schedule values, the weight-decay mask, and gradient accumulation inside the train step."""

import math

import jax
import numpy as np
import optax
import pytest
from conftest import ROOT, tiny_config

from gptjax import config
from gptjax.core import model, optim, steps
from gptjax.data.batching import from_windows


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


# lr 1, floor 0.1, warmup 2 steps, cosine over steps 2..6, then flat: by hand,
# 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 4)) / 2 for s in 2..6.
HAND_COSINE_THEN_FLOOR = [0.0, 0.5, 1.0, 0.8681981, 0.55, 0.2318019, 0.1, 0.1, 0.1, 0.1, 0.1]


def test_cosine_reaches_the_floor_at_decay_steps_then_holds():
    cfg = config.OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, decay_steps=6)
    lr = optim.schedule(cfg, 10)
    assert [float(lr(s)) for s in range(11)] == pytest.approx(HAND_COSINE_THEN_FLOOR, abs=1e-6)
    # The same in tokens: 32 tokens a step (batch 4 x seq_len 8), 192 tokens = 6 steps.
    by_tokens = config.OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, decay_tokens=192)
    lr = optim.schedule(by_tokens, 10, tokens_per_step=32)
    assert [float(lr(s)) for s in range(11)] == pytest.approx(HAND_COSINE_THEN_FLOOR, abs=1e-6)
    assert optim.decay_end(by_tokens, 10, 36) == 5  # 192 / 36 = 5.33 steps: rounded


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.decay_steps=6", "optim.decay_tokens=192"], "both set; set one"),
        (["optim.decay_steps=6", "optim.schedule=wsd"], "applies to optim.schedule=cosine"),
        (["optim.decay_steps=2", "optim.warmup_steps=2"], "must exceed optim.warmup_steps=2"),
    ],
)
def test_decay_settings_that_cannot_work_are_one_line(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, overrides)


@pytest.mark.parametrize("name", ["125m", "1.3b", "175b"])
def test_gpt3_configs_decay_over_260b_tokens_then_hold_10_percent(name):
    """GPT-3 (Brown et al. 2020, 2.2 and appendix B): warmup over 375M tokens, cosine to 10%
    over 260B tokens, then 10% for the rest of the 300B."""
    cfg = config.load(ROOT / "configs" / f"gpt3_{name}.yaml")
    tokens = cfg.train.batch_size * cfg.model.seq_len
    peak, total = cfg.optim.lr, cfg.train.steps
    assert cfg.optim.warmup_steps == round(375e6 / tokens)
    end = round(260e9 / tokens)
    lr = steps.build(cfg).schedule if name == "125m" else optim.schedule(cfg.optim, total, tokens)
    assert float(lr(0)) == 0.0
    warmup = cfg.optim.warmup_steps
    assert float(lr(warmup)) == pytest.approx(peak, rel=1e-6)
    for fraction in (0.25, 0.5, 0.9):
        step = warmup + round(fraction * (end - warmup))
        cosine = (1 + math.cos(math.pi * (step - warmup) / (end - warmup))) / 2
        assert float(lr(step)) == pytest.approx(peak * (0.1 + 0.9 * cosine), rel=1e-5), step
    for step in (end, end + 1, (end + total) // 2, total):
        assert float(lr(step)) == pytest.approx(0.1 * peak, rel=1e-6), step


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
    loss1, grads1, _, _ = grads(graphdef, params, batch, 1)
    loss4, grads4, _, _ = grads(graphdef, params, batch, 4)
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
    runs = []
    for cfg in (base, accumulated):
        setup = steps.build(cfg, jax.devices()[:1])
        state = steps.init_state(setup)
        before = jax.device_get(state["params"])  # the step donates `state`
        state, stats = steps.make_train_step(setup)(state, batch)
        state = jax.device_get(state)
        moved = jax.tree.map(np.subtract, state["params"], before)
        mu, nu = optax.tree.get(state["opt_state"], "mu"), optax.tree.get(state["opt_state"], "nu")
        runs.append(({k: float(v) for k, v in stats.items()}, mu, nu, moved))
    (stats1, mu1, nu1, moved1), (stats4, mu4, nu4, moved4) = runs  # `before` is the same init
    assert stats4["loss"] == pytest.approx(stats1["loss"], rel=1e-6)
    assert stats4["grad_norm"] == pytest.approx(stats1["grad_norm"], rel=1e-5)
    # Summing micro-batch gradients adds the same f32 numbers in another order, so only what
    # that order cannot change is compared. After one step Adam's moments are mu = (1-b1)·g and
    # nu = (1-b2)·g² (g clipped): g and |g| agree to f32 summation noise, as in the test above.
    b1, b2, lr = base.optim.b1, base.optim.b2, base.optim.lr
    determined = 0
    for m1, m4, v1, v4, d1, d4, p in zip(
        *map(jax.tree.leaves, (mu1, mu4, nu1, nu4, moved1, moved4, before)), strict=True
    ):
        g1, g4 = m1 / (1 - b1), m4 / (1 - b1)
        noise = 1e-5 * float(np.abs(g1).max())
        np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=noise)
        root1, root4 = np.sqrt(v1 / (1 - b2)), np.sqrt(v4 / (1 - b2))  # |g|
        np.testing.assert_allclose(root4, root1, rtol=1e-4, atol=noise)
        np.testing.assert_allclose(root1, np.abs(g1), rtol=1e-5)
        # The first update is lr·g/(|g| + eps) (+ decay): a g within summation noise of zero can
        # flip sign (one weight in 24,576 moved by ±lr on an AVX-512 Xeon), so the move is
        # compared only where |g| ≥ 100·noise; there d(update)/dg bounds the difference below
        # 1e-5·lr whatever the CPU's reduction order, plus the rounding of p + update to f32
        # (one f32 spacing at |p| = 1 is 4e-5·lr).
        big = np.abs(g1) >= 100 * noise
        tol = 1e-5 * lr + 2 * np.spacing(np.abs(p))
        assert np.all(np.abs(d4 - d1)[big] <= tol[big])
        determined += int(big.sum())
    total = sum(x.size for x in jax.tree.leaves(moved1))
    assert determined > 0.9 * total  # the comparison covers the bulk of the weights
