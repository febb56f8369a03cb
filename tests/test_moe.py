"""The mixture-of-experts MLP against a NumPy loop over experts (forward, and gradients by
central differences of that loop), capacity drops against a hand count, the router losses
against their formulas on hand-made routings, the layer layout, one-line config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config
from gptjax.config import ConfigError
from gptjax.core import model, moe
from tests.conftest import ROOT

D, E, F, K = 8, 4, 6, 2


def moe_cfg(**moe_keys) -> config.ModelConfig:
    keys = {"experts": E, "top_k": K, "d_ff": F, **moe_keys}
    return config.ModelConfig(d_model=D, n_head=2, n_layer=2, moe=keys)


def draw(cfg, seed=0, scale=1.5):
    """One layer's MoE parameters (no layers axis) and a [2, 6, D] input, in NumPy float64;
    large enough that the clamp of swiglu_clamped bites."""
    rng = np.random.default_rng(seed)
    shapes = {
        "router_w": (D, E),
        "expert_up_w": (E, D, F),
        "expert_gate_w": (E, D, F),
        "expert_down_w": (E, F, D),
    }
    if cfg.moe.router_bias:
        shapes["router_b"] = (E,)
    if cfg.moe.expert_bias:
        shapes |= {"expert_up_b": (E, F), "expert_gate_b": (E, F), "expert_down_b": (E, D)}
    p = {name: scale * rng.standard_normal(shape) for name, shape in shapes.items()}
    return p, rng.standard_normal((2, 6, D))


def numpy_moe(p, h, cfg, capacity=None):
    """The oracle: route each token on its own, then loop over the experts, each on the tokens
    that chose it (in token order, the first `capacity` of them when given); float64."""
    m = cfg.moe
    x = h.reshape(-1, D)
    logits = x @ p["router_w"] + p.get("router_b", 0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    if m.gating == "topk_softmax":
        top = np.take_along_axis(logits, chosen, -1)
        gates = np.exp(top - top.max(-1, keepdims=True))
        gates /= gates.sum(-1, keepdims=True)
    else:
        gates = np.take_along_axis(probs, chosen, -1)
        if m.renormalize:
            gates = gates / gates.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for e in range(E):
        tokens, slots = np.nonzero(chosen == e)  # row-major: token order
        if capacity is not None:
            tokens, slots = tokens[:capacity], slots[:capacity]
        xe = x[tokens]
        up = xe @ p["expert_up_w"][e] + p.get("expert_up_b", np.zeros((E, F)))[e]
        gate = xe @ p["expert_gate_w"][e] + p.get("expert_gate_b", np.zeros((E, F)))[e]
        if m.activation == "swiglu":
            act = gate / (1 + np.exp(-gate)) * up
        else:
            gate, up = np.minimum(gate, m.limit), np.clip(up, -m.limit, m.limit)
            act = (up + 1) * gate / (1 + np.exp(-m.alpha * gate))
        out = act @ p["expert_down_w"][e] + p.get("expert_down_b", np.zeros((E, D)))[e]
        np.add.at(y, tokens, out * gates[tokens, slots][:, None])
    return y.reshape(h.shape), chosen


VARIANTS = {
    "gpt_oss": {"activation": "swiglu_clamped", "router_bias": True, "expert_bias": True},
    "qwen3": {"gating": "softmax_topk", "renormalize": False},
    "renormalized": {"gating": "softmax_topk", "renormalize": True, "expert_bias": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropless_forward_and_gradients_equal_a_numpy_loop_over_experts(variant):
    cfg = moe_cfg(**VARIANTS[variant])
    p, h = draw(cfg, seed=list(VARIANTS).index(variant))
    want, chosen = numpy_moe(p, h, cfg)
    if variant == "gpt_oss":  # the clamps are exercised
        x = h.reshape(-1, D)
        assert (np.einsum("td,edf->tef", x, p["expert_gate_w"]) > cfg.moe.limit).any()
    R = np.random.default_rng(9).standard_normal(h.shape)  # the loss: <y, R>

    def loss(p, h):
        return jnp.sum(moe.moe_mlp(p, h, cfg)[0] * R)

    f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    y, aux = jax.jit(lambda p, h: moe.moe_mlp(p, h, cfg))(f32(p), f32(h))
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-4)
    assert float(aux["dropped"]) == 0 and float(aux["assigned"]) == h.size // D * K
    grads = jax.jit(jax.grad(loss, (0, 1)))(f32(p), f32(h))
    # each gradient along a random direction against the NumPy loop's central difference
    rng, eps = np.random.default_rng(5), 1e-5
    inputs = {**p, "h": h}
    for name, grad in {**grads[0], "h": grads[1]}.items():
        v = rng.standard_normal(inputs[name].shape)
        outs = []
        for s in (eps, -eps):
            moved = {**inputs, name: inputs[name] + s * v}
            y_s, chosen_s = numpy_moe({k: a for k, a in moved.items() if k != "h"}, moved["h"], cfg)
            assert (chosen_s == chosen).all()  # no routing flipped
            outs.append(y_s)
        numeric = np.sum((outs[0] - outs[1]) * R) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad, np.float64) * v))
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=2e-3), name


def test_capacity_drops_exactly_the_overflow_in_token_order():
    """6 tokens, 2 choices each, 3 experts, capacity_factor 0.5: ceil(0.5 · 6 · 2 / 3) = 2 per
    expert. Expert 0 is chosen by tokens 0, 1, 2, 3, 5 (keeps 0, 1), expert 1 by 0, 2, 3, 4
    (keeps 0, 2), expert 2 by 1, 4, 5 (keeps 1, 4): 3 + 2 + 1 = 6 of 12 dropped."""
    cfg = config.ModelConfig(
        d_model=D, n_head=2, n_layer=2, moe={"experts": 3, "top_k": 2, "d_ff": F,
                                              "capacity_factor": 0.5},
    )  # fmt: skip
    assert moe.capacity(6, cfg) == 2
    expert_TK = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [0, 2]], np.int32)
    rng = np.random.default_rng(3)
    gate_TK = rng.uniform(0.1, 1.0, (6, 2))
    x = rng.standard_normal((6, D))
    w = {
        "up": rng.standard_normal((3, D, F)),
        "gate": rng.standard_normal((3, D, F)),
        "down": rng.standard_normal((3, F, D)),
    }
    kept = {(0, 0), (1, 0), (0, 1), (2, 1), (1, 1), (4, 0)}  # (token, slot) by hand
    want = np.zeros((6, D))
    for t, k in kept:
        e = expert_TK[t, k]
        up, gate = x[t] @ w["up"][e], x[t] @ w["gate"][e]
        want[t] += gate_TK[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ w["down"][e])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    run = jax.jit(moe.experts_local, static_argnums=(4, 5))
    y, dropped = run(jax.tree.map(f32, w), f32(x), expert_TK, f32(gate_TK), cfg, 2)
    assert int(dropped) == 6
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    # dropless keeps all 12
    y, dropped = run(jax.tree.map(f32, w), f32(x), expert_TK, f32(gate_TK), cfg, None)
    assert int(dropped) == 0 and not np.allclose(np.asarray(y), want, atol=1e-3)


def test_router_losses_equal_their_formulas_on_a_hand_made_routing():
    """Router weights = identity, so the logits are the inputs. Top-1 picks experts 0, 1, 0, 2
    of 3: f = (2, 1, 1) / 4; aux = 3 · Σ f_e · mean_t p_te, z = mean_t logsumexp(logits_t)²."""
    logits = np.array([[2.0, 0, 0], [0, 3, 0], [1, 0, 0], [0, 0, 5]])
    cfg = config.ModelConfig(d_model=3, n_head=1, n_layer=1, moe={"experts": 3, "top_k": 1})
    expert, gate, aux = moe.route({"router_w": jnp.eye(3)}, jnp.asarray(logits), cfg)
    assert np.asarray(expert)[:, 0].tolist() == [0, 1, 0, 2]
    np.testing.assert_allclose(np.asarray(gate), 1.0)  # softmax over one chosen logit
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.array([2, 1, 1]) / 4
    assert float(aux["aux_loss"]) == pytest.approx(3 * np.sum(f * probs.mean(0)), rel=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(aux["z_loss"]) == pytest.approx(np.mean(lse**2), rel=1e-6)
    # a router whose probabilities are uniform scores exactly top_k, whatever it picks
    cfg = config.ModelConfig(d_model=3, n_head=1, n_layer=1, moe={"experts": 3, "top_k": 2})
    _, _, aux = moe.route({"router_w": jnp.zeros((3, 3))}, jnp.asarray(logits), cfg)
    assert float(aux["aux_loss"]) == pytest.approx(2.0, rel=1e-6)
    assert float(aux["z_loss"]) == pytest.approx(math.log(3) ** 2, rel=1e-6)


def test_moe_layers_stack_apart_and_the_scan_covers_both_patterns():
    debug = config.load(ROOT / "configs" / "debug_moe.yaml").model
    assert debug.moe_layers() == (True, True) and debug.scan_group == 1
    shapes = model.param_shapes(debug)
    assert shapes["blocks.expert_up_w"] == (2, 4, 64, 128)
    assert shapes["blocks.router_w"] == (2, 64, 4) and "blocks.fc_w" not in shapes
    # every 2nd layer on a 2-place attention pattern; Qwen3's decoder_sparse_step=1 with
    # mlp_only_layers=[1]: no period shorter than the model
    base = {"d_model": 16, "n_head": 2, "n_layer": 4, "mlp": "swiglu"}
    cfg = config.ModelConfig(**base, attention_pattern=["dense", "local:4"],
                             moe={"experts": 4, "every": 2})  # fmt: skip
    assert cfg.moe_layers() == (False, True, False, True) and cfg.scan_group == 2
    shapes = model.param_shapes(cfg)
    assert shapes["blocks.fc_w"][0] == 2 and shapes["blocks.router_w"][0] == 2
    cfg = config.ModelConfig(**base, moe={"experts": 4, "dense_layers": [1]})
    assert cfg.moe_layers() == (True, False, True, True) and cfg.scan_group == 4


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"experts": 4, "top_k": 5}, "model.moe.top_k=5 exceeds model.moe.experts=4"),
        ({"experts": 4, "every": 3}, "no layer is MoE"),
        ({"experts": 4, "dense_layers": [2]}, "layer 2 is not in 0..1"),
        ({"experts": 1}, "model.moe.experts"),
        ({"experts": 4, "capacity_factor": 0}, "model.moe.capacity_factor"),
        ({"experts": 4, "gating": "sparse"}, "model.moe.gating"),
    ],
)
def test_bad_moe_config_is_one_line(keys, message):
    overrides = [f"model.moe.{key}={value}" for key, value in keys.items()]
    with pytest.raises(ConfigError, match=message) as error:
        config.load(None, ["model.n_layer=2", *overrides])
    assert "\n" not in str(error.value)
