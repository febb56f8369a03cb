"""The block options (GPT-1, GPT-Neo, Llama, Mistral, Qwen2, gpt-oss-style) against an
independent float64 NumPy transformer, RoPE scaling against transformers' own frequencies, the
KV cache against full recompute past the window, meshes, presets and FLOPs."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config
from gptjax.core import attention, model

ROOT = Path(__file__).resolve().parents[1]


def family_cfg(**changes):
    values = dict(vocab_size=97, seq_len=24, n_layer=2, n_head=4, d_model=32, dtype="float32")
    values.update(changes)
    return config.ModelConfig(**values)


LLAMA = dict(
    norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, qkv_bias=False,
    attn_out_bias=False, mlp_bias=False, tie_embeddings=False, d_ff=48, rope_theta=500000.0,
)  # fmt: skip
FAMILIES = {
    "gpt1": dict(norm_placement="post", final_norm=False, mlp="gelu"),
    "gpt_neo": dict(attention_pattern=("dense", "local:5"), qkv_bias=False, attention_scale=1.0),
    "llama": LLAMA,
    "mistral": {**LLAMA, "attention_pattern": ("local:6",)},
    "qwen2": {**LLAMA, "qkv_bias": True},
    "softcap": {"logit_softcap": 0.5},  # GPT-2's block, logits c * tanh(logits / c)
    "gpt_oss": {
        **LLAMA,
        "attention_pattern": ("local:4", "dense"),
        "attention_sinks": True,
        "qkv_bias": True,
        "attn_out_bias": True,
        "norm_eps": 1e-6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position": 8},
    },  # fmt: skip
    "odd": dict(
        mlp="relu2",
        qk_norm=True,
        n_kv_head=1,
        head_dim=12,
        embed_scale=2.5,
        positions="none",
        norm="rmsnorm",
        n_layer=3,
        attention_pattern=("local:3",),
    ),  # fmt: skip
}


def numpy_forward(cfg, p, tokens):
    """The whole model in float64 NumPy, written from the papers (not from gptjax's code): one
    loop per head, RoPE as complex rotation of (i, i + H/2) pairs with theta^(-2i/H)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens.shape
    N, K, H, eps = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.norm_eps

    def normed(x, scale, bias=None):
        if cfg.norm == "rmsnorm":
            y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
        else:
            mu = x.mean(-1, keepdims=True)
            y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        return y * scale + (0 if bias is None else bias)

    inv, factor = attention.rope_frequencies(cfg)  # scaling checked against transformers below
    if cfg.rope_scaling is None:
        inv, factor = cfg.rope_theta ** (-np.arange(0, H, 2) / H), 1.0

    def rope(x):  # [T, H]
        z = (x[:, : H // 2] + 1j * x[:, H // 2 :]) * np.exp(1j * np.arange(T)[:, None] * inv)
        return np.concatenate([z.real, z.imag], -1) * factor

    def act(h):
        if cfg.mlp == "gelu_tanh":
            return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        if cfg.mlp == "gelu":
            return 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        return np.maximum(h, 0) ** 2

    x = p["wte"][tokens] * cfg.embed_scale
    if cfg.positions == "learned":
        x = x + p["wpe"][:T]
    blocks = p["blocks"]
    for i, window in enumerate(cfg.windows()):
        b = {name: value[i] for name, value in blocks.items()}
        pre = cfg.norm_placement == "pre"
        h = normed(x, b["ln1_scale"], b.get("ln1_bias")) if pre else x
        if "qkv_w" in b:
            q, k, v = (np.einsum("btd,dnh->btnh", h, b["qkv_w"][:, c]) for c in range(3))
            if "qkv_b" in b:
                q, k, v = q + b["qkv_b"][0], k + b["qkv_b"][1], v + b["qkv_b"][2]
        else:
            q = np.einsum("btd,dnh->btnh", h, b["q_w"]) + b.get("q_b", 0)
            k, v = (np.einsum("btd,dnh->btnh", h, b["kv_w"][:, c]) for c in range(2))
            if "kv_b" in b:
                k, v = k + b["kv_b"][0], v + b["kv_b"][1]
        out = np.zeros((B, T, N, H))
        allowed = np.tril(np.ones((T, T), bool))
        if window is not None:
            allowed &= np.subtract.outer(np.arange(T), np.arange(T)) < window
        scale = cfg.attention_scale or 1 / math.sqrt(H)
        for r in range(B):
            for n in range(N):
                qn, kn, vn = q[r, :, n], k[r, :, n // (N // K)], v[r, :, n // (N // K)]
                if cfg.qk_norm:
                    qn = qn / np.sqrt((qn**2).mean(-1, keepdims=True) + eps) * b["q_norm"]
                    kn = kn / np.sqrt((kn**2).mean(-1, keepdims=True) + eps) * b["k_norm"]
                if cfg.positions == "rope":
                    qn, kn = rope(qn), rope(kn)
                s = np.where(allowed, qn @ kn.T * scale, -np.inf)
                e = np.exp(s - s.max(-1, keepdims=True))
                denominator = e.sum(-1, keepdims=True)
                if cfg.attention_sinks:
                    denominator += np.exp(b["sinks"][n] - s.max(-1, keepdims=True))
                out[r, :, n] = (e / denominator) @ vn
        a = np.einsum("btnh,nhd->btd", out, b["out_w"]) + b.get("out_b", 0)
        x = x + a if pre else normed(x + a, b["ln1_scale"], b.get("ln1_bias"))
        h = normed(x, b["ln2_scale"], b.get("ln2_bias")) if pre else x
        up = h @ b["fc_w"] + b.get("fc_b", 0)
        if cfg.mlp == "swiglu":
            gate = h @ b["gate_w"] + b.get("gate_b", 0)
            up = gate / (1 + np.exp(-gate)) * up
        else:
            up = act(up)
        m = up @ b["proj_w"] + b.get("proj_b", 0)
        x = x + m if pre else normed(x + m, b["ln2_scale"], b.get("ln2_bias"))
    if cfg.final_norm:
        x = normed(x, p["ln_f_scale"], p.get("ln_f_bias"))
    out = x @ (p["wte"].T if cfg.tie_embeddings else p["lm_head"])
    c = cfg.logit_softcap
    return c * np.tanh(out / c) if c else out


def random_params(cfg, seed=0):
    """Every parameter random (biases, norm gains and sinks too): N(0, 0.1), gains 1 + N(0, 0.1),
    drawn by NumPy for the model's own parameter tree (compiling JAX's initialiser costs ~10 s
    per family and adds nothing to these oracles)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        gain = name.endswith("_scale") or name in ("q_norm", "k_norm")
        return (gain + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    shapes = nnx.to_pure_dict(model.abstract(cfg)[1])
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_match_numpy_float64(family):
    cfg = family_cfg(**FAMILIES[family])
    params = random_params(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_len))
    logits = jax.jit(lambda p, t: nnx.merge(model.abstract(cfg)[0], p)(t))(params, tokens)
    np.testing.assert_allclose(
        np.asarray(logits), numpy_forward(cfg, params, tokens), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize(
    "scaling",
    [
        {"type": "linear", "factor": 4.0},
        {"type": "llama3", "factor": 32.0, "original_max_position": 8192},
        {"type": "llama3", "factor": 8.0, "original_max_position": 2048, "high_freq_factor": 2.0},
        {"type": "yarn", "factor": 32.0, "original_max_position": 4096},
        {"type": "yarn", "factor": 32.0, "original_max_position": 4096, "truncate": False},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_rope_scaling_frequencies_match_transformers(scaling):
    """Inverse frequencies and the cos/sin factor of each scaling against transformers' own
    RoPE initialisers (the functions its Llama, Qwen2 and gpt-oss models call)."""
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = 150000.0
    cfg = family_cfg(
        positions="rope", d_model=256, n_head=4, head_dim=64, rope_theta=theta,
        rope_scaling=scaling,
    )  # fmt: skip
    s = cfg.rope_scaling
    hf_params = {"rope_type": s.type, "rope_theta": theta, "factor": s.factor}
    if s.type != "linear":
        hf_params["original_max_position_embeddings"] = s.original_max_position
    if s.type == "llama3":
        hf_params |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    if s.type == "yarn":
        hf_params |= {"beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
    hf = LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
        rope_parameters=hf_params,
    )  # fmt: skip
    want, want_factor = ROPE_INIT_FUNCTIONS[hf_params["rope_type"]](hf, "cpu")
    got, got_factor = attention.rope_frequencies(cfg)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert got_factor == pytest.approx(want_factor, rel=1e-9)


CACHED = family_cfg(
    vocab_size=128, seq_len=40, n_layer=4, n_head=4, n_kv_head=2, norm="rmsnorm",
    positions="rope", mlp="swiglu", qkv_bias=True, attn_out_bias=False, mlp_bias=False,
    attention_pattern=("local:5", "dense"), attention_sinks=True,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position": 16},
)  # fmt: skip


def test_kv_cache_with_windows_gqa_rope_sinks_equals_full_recompute():
    """Two left-padded prompts (9 and 3 tokens: one longer than the window of 5, so the ring
    wraps within the prefill), then 14 tokens one at a time, far past the window: each step's
    logits equal running the row's real tokens from scratch. The local layers keep a ring of 5
    slots, the dense ones all 40."""
    cfg = CACHED
    gpt = nnx.merge(model.abstract(cfg)[0], random_params(cfg, seed=3))
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 128, 9)), list(rng.integers(1, 128, 3))]
    P = 9
    tokens, segments, positions = (np.zeros((2, P), np.int32) for _ in range(3))
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = prompt
        segments[row, P - len(prompt) :] = 1
        positions[row, P - len(prompt) :] = np.arange(len(prompt))
    cache = model.init_cache(cfg, 2, slots=P)  # as generate does: prefill into P slots, grow
    assert [k.shape[3] for k in cache["k"]] == [5, 9]
    extend = jax.jit(lambda t, p, c, s=None: gpt.extend(t, p, c, s))
    logits, cache = extend(tokens, positions, cache, segments)
    cache = model.grow_cache(cfg, cache, cfg.seq_len)
    assert [k.shape[3] for k in cache["k"]] == [5, 40] and cache["k"][0].shape[2] == 2
    seqs = [list(p) for p in prompts]
    got = [[np.asarray(logits[r, -1])] for r in range(2)]
    for _ in range(14):
        nxt = np.array([[int(np.argmax(g[-1]))] for g in got], np.int32)
        for r in range(2):
            seqs[r].append(int(nxt[r, 0]))
        pos = np.array([[len(s) - 1] for s in seqs], np.int32)
        logits, cache = extend(nxt, pos, cache)
        for r in range(2):
            got[r].append(np.asarray(logits[r, 0]))
    recompute = jax.jit(lambda t: gpt(t))
    for r in range(2):
        full = np.asarray(recompute(jnp.asarray([seqs[r]], jnp.int32)))[0]
        np.testing.assert_allclose(
            np.stack(got[r]), full[len(prompts[r]) - 1 :], atol=1e-4, rtol=1e-4
        )
