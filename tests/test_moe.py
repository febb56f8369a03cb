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
        y, aux = moe.moe_mlp(p, h, cfg)
        return jnp.sum(y * R), (y, aux)

    f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(f32(p), f32(h))
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-4)
    assert float(aux["dropped"]) == 0 and float(aux["assigned"]) == h.size // D * K
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


def test_parameter_counts_split_total_active_and_embedding():
    """configs/debug_moe.yaml: 2 layers of 4 experts (3 · 64 · 128 each), top-2, an untied
    512 x 64 token table."""
    cfg = config.load(ROOT / "configs" / "debug_moe.yaml").model
    counts = model.param_counts(cfg)
    experts = 2 * 4 * 3 * 64 * 128
    assert counts["expert_params"] == experts
    assert counts["active_params"] == counts["params"] - experts // 2  # 2 of 4 experts
    assert counts["embedding_params"] == 512 * 64
    assert counts["active_non_embedding_params"] == counts["active_params"] - 512 * 64
    dense = cfg.model_copy(update={"moe": None})
    # what a token uses: the dense model's MLP swapped for 2 SwiGLU experts and a router
    router = 2 * 64 * 4
    assert counts["active_params"] == model.param_counts(dense)["params"] + router + 2 * (
        2 * 3 * 64 * 128 - 3 * 64 * 128
    )
    from gptjax.core import flops

    attention = flops.flops_per_token(cfg) - 6 * counts["active_params"]
    assert attention == 12 * 4 * 16 * 2 * 64  # the rest of 6N + 12LHQT is the attention term


# --- the model: train steps, generation -----------------------------------------------------


def numpy_params(cfg, seed, scale=0.1):
    """Every parameter around its initial value (norm gains 1, the rest 0), in NumPy from the
    model's own shapes (no JAX initialisation to compile)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for name, shape in model.param_shapes(cfg).items():
        base = 1.0 if name.endswith("_scale") else 0.0
        *parents, last = name.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return params


def test_a_moe_train_step_learns_and_logs_the_router_figures(tmp_path):
    """8 steps on one batch: the loss falls; the metrics carry moe/aux_loss, moe/z_loss and the
    dropped fraction of a capacity factor of 1; the reported loss is the language-model loss
    alone (the router losses go into the gradient, not into the logged loss)."""
    from gptjax.core import steps

    cfg = config.load(
        ROOT / "configs" / "debug_moe.yaml",
        [f"run_dir={tmp_path}", "model.seq_len=32", "train.batch_size=4",
         "model.moe.capacity_factor=1.0", "model.moe.aux_loss=0.1", "optim.warmup_steps=0"],
    )  # fmt: skip
    setup = steps.build(cfg, jax.devices()[:1])
    params = jax.tree.map(jnp.asarray, numpy_params(cfg.model, 0, scale=0.02))
    state = {  # no jitted initialisation to compile
        "params": params,
        "opt_state": setup.optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (4, 33)).astype(np.int32)  # 64 ids: learnable in 8 steps
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((4, 32), np.int32),
        "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1)),
        "segment_ids": np.ones((4, 32), np.int32),
    }
    step = steps.make_train_step(setup)
    history = []
    for _ in range(8):
        state, stats = step(state, batch)
        history.append({k: float(v) for k, v in stats.items()})
    # small weights: the first loss is about ln(vocab); 0.1 · aux_loss (>= 0.2) is not in it
    assert history[0]["loss"] == pytest.approx(math.log(512), abs=0.1)
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    for record in history:
        assert record["moe/aux_loss"] >= 2.0 - 1e-4  # top_k 2: balanced routing scores 2
        assert record["moe/z_loss"] > 0
        assert 0 <= record["moe/dropped"] < 0.5
    assert any(record["moe/dropped"] > 0 for record in history)


def test_generation_with_the_cache_routes_each_token_as_the_full_forward_does(tmp_path):
    """Greedy tokens decoded with the KV cache (prefill, then one token a step, each routed on
    its own) equal the argmax of a dropless full forward over the whole text; the model is in
    capacity mode (capacity factor 1), which generation ignores."""
    from flax import nnx

    from gptjax.core import steps
    from gptjax.inference import generate
    from gptjax.inference.generate import Sampling

    overrides = [f"run_dir={tmp_path}", "model.moe.capacity_factor=1.0"]
    cfg = config.load(ROOT / "configs" / "debug_moe.yaml", overrides)
    setup = steps.build_model(cfg, jax.devices()[:1])
    params = jax.tree.map(jnp.asarray, numpy_params(cfg.model, 1, scale=0.15))
    prompt = np.random.default_rng(2).integers(2, 512, 7).tolist()
    gen = generate.Generator(setup, params, 8)
    got = []
    for tokens, emitted, _ in gen.stream([prompt], 24, Sampling(0.0)):
        got += tokens[0][emitted[0]].tolist()

    dropless = cfg.model.model_copy(update={"moe": cfg.model.moe.model_copy(
        update={"capacity_factor": None})})  # fmt: skip
    graphdef, _ = model.abstract(dropless)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    seq = list(prompt)
    while len(seq) < len(prompt) + 24:
        window = np.zeros((1, 64), np.int32)
        window[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(params, window)[0, len(seq) - 1]))))
    assert got == seq[len(prompt) :]
    assert len(set(got)) > 3  # not one token repeated


def test_plan_counts_gpt_oss_120b_by_hand_and_its_expert_bytes_per_device():
    """configs/gpt_oss_120b.yaml on 8 devices (expert 8), nothing compiled: total and active
    parameters from the shapes by hand, the experts' f32 weights split 8 ways."""
    from gptjax.tools import plan

    cfg = config.load(ROOT / "configs" / "gpt_oss_120b.yaml")
    L, D, N, Kv, H, E, k, F, V = 36, 2880, 64, 8, 64, 128, 4, 2880, 201088
    attention = D * N * H + D * 2 * Kv * H + N * H + 2 * Kv * H + N * H * D + D + N + 2 * D
    experts = 3 * E * D * F + E * (2 * F + D)
    router = D * E + E
    total = L * (attention + router + experts) + D + 2 * V * D  # final norm, untied head
    report = plan.plan(cfg, jax.devices()[:8], xla=False)
    assert report["params"] == total == 116_829_156_672
    assert report["expert_params"] == L * experts
    assert report["active_params"] == total - L * experts + L * experts * k // E
    assert report["active_non_embedding_params"] == report["active_params"] - V * D
    assert report["mesh"]["expert"] == 8
    assert report["bytes_per_device"]["experts"] == 4 * L * experts // 8
    assert "active parameters    5,711,982,912" in plan.format_text(report)


def test_the_layer_scan_gives_each_layer_its_own_mlp_slice():
    """4 layers, attention [dense, local:4], MoE except layer 1 (one scan step of 4 layers): the
    model's logits equal a Python loop over the layers, layer l taking attention slice l and the
    l-th MLP of its kind (MoE layers 0, 2, 3 -> MoE slices 0, 1, 2; layer 1 -> dense slice 0)."""
    from flax import nnx

    from gptjax.core.attention import Context

    cfg = config.ModelConfig(
        vocab_size=64, seq_len=8, d_model=16, n_head=2, n_layer=4, mlp="swiglu",
        attention_pattern=["dense", "local:4"],
        moe={"experts": 4, "top_k": 2, "d_ff": 8, "dense_layers": [1], "router_bias": True},
    )  # fmt: skip
    assert cfg.moe_layers() == (True, False, True, True) and cfg.scan_group == 4
    params = jax.tree.map(jnp.asarray, numpy_params(cfg, 4, scale=0.3))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)
    graphdef, _ = model.abstract(cfg)
    want = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)

    gpt = nnx.merge(graphdef, params)
    x, blocks = gpt._embed(tokens, None), params["blocks"]
    slot = {"moe": [0, None, 1, 2], "dense": [None, 0, None, None]}
    for layer in range(4):
        kind = "moe" if cfg.moe_layers()[layer] else "dense"
        p = {}
        for name, a in blocks.items():
            if name in moe.PARAMS:
                if kind == "moe":
                    p[name] = a[slot["moe"][layer]]
            elif name in model.DENSE_MLP:
                if kind == "dense":
                    p[name] = a[slot["dense"][layer]]
            else:
                p[name] = a[layer]
        x, _, _ = model.block(p, x, cfg, Context(None, None), cfg.windows()[layer])
    got = gpt.logits(gpt._final_norm(x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
