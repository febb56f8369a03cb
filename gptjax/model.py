"""The GPT-2 architecture in Flax NNX, layers stacked and run with `lax.scan`.

Every parameter carries logical axis names (`out_sharding` metadata); the model knows no mesh.
Shapes use B batch, T sequence, D d_model, N heads, H head_dim, F d_ff, V vocab, L layers.
Parameters are kept in `param_dtype` (f32); matmuls run in `dtype` (bf16 or f32); layer norms,
softmax statistics and logits are f32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ConfigError, ModelConfig
from gptjax.sharding import constrain

LN_EPS = 1e-5  # GPT-2's layer-norm epsilon

REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, names, std: float | None, fill: float = 0.0, dtype=jnp.float32):
    """A parameter of `shape` named by logical `names`: normal(std), or constant `fill`."""
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names))


class Blocks(nnx.Module):
    """All n_layer transformer blocks, each parameter stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, N, H, F = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ff
        dt = jnp.dtype(cfg.param_dtype)
        residual_std = 0.02 / math.sqrt(2 * L)  # GPT-2: scale residual projections
        self.ln1_scale = _param(rngs, (L, D), ("layers", "embed"), None, 1.0, dt)
        self.ln1_bias = _param(rngs, (L, D), ("layers", "embed"), None, 0.0, dt)
        self.qkv_w = _param(
            rngs, (L, D, 3, N, H), ("layers", "embed", "qkv", "heads", "head_dim"), 0.02, dtype=dt
        )
        self.qkv_b = _param(rngs, (L, 3, N, H), ("layers", "qkv", "heads", "head_dim"), None, 0, dt)
        self.out_w = _param(
            rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), residual_std, dtype=dt
        )
        self.out_b = _param(rngs, (L, D), ("layers", "embed"), None, 0.0, dt)
        self.ln2_scale = _param(rngs, (L, D), ("layers", "embed"), None, 1.0, dt)
        self.ln2_bias = _param(rngs, (L, D), ("layers", "embed"), None, 0.0, dt)
        self.fc_w = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), 0.02, dtype=dt)
        self.fc_b = _param(rngs, (L, F), ("layers", "mlp"), None, 0.0, dt)
        self.proj_w = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), residual_std, dtype=dt)
        self.proj_b = _param(rngs, (L, D), ("layers", "embed"), None, 0.0, dt)


def layer_norm(x_BTD, scale_D, bias_D, dtype):
    x = x_BTD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(dtype)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_impl(setting: str, dtype) -> str:
    """`auto` picks cuDNN flash attention on NVIDIA GPUs in bf16/f16, XLA otherwise."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if setting == "cudnn" and not (on_gpu and half):
        need = "an NVIDIA GPU" if not on_gpu else "model.dtype=bfloat16"
        raise ConfigError(f"model.attention=cudnn needs {need}; use model.attention=auto or xla")
    if setting != "auto":
        return setting
    return "cudnn" if on_gpu and half else "xla"


def block(p: dict[str, jax.Array], x_BTD: jax.Array, cfg: ModelConfig, key=None) -> jax.Array:
    """One pre-LayerNorm GPT-2 block on one layer's parameters `p` (no layers axis)."""
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(key, 3) if key is not None else (None, None, None)
    cast = {name: value.astype(dt) for name, value in p.items()}

    h = layer_norm(x_BTD, p["ln1_scale"], p["ln1_bias"], dt)
    qkv = jnp.einsum("btd,dcnh->btcnh", h, cast["qkv_w"]) + cast["qkv_b"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    a = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=attention_impl(cfg.attention, dt)
    )
    a = jnp.einsum("btnh,nhd->btd", a, cast["out_w"]) + cast["out_b"]
    x_BTD = x_BTD + _dropout(a, cfg.dropout, keys[0])
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))

    h = layer_norm(x_BTD, p["ln2_scale"], p["ln2_bias"], dt)
    h = jnp.einsum("btd,df->btf", h, cast["fc_w"]) + cast["fc_b"]
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "seq", "mlp"))
    h = jnp.einsum("btf,fd->btd", h, cast["proj_w"]) + cast["proj_b"]
    x_BTD = x_BTD + _dropout(h, cfg.dropout, keys[1])
    return constrain(x_BTD, ("batch", "seq", "embed"))


class GPT(nnx.Module):
    """GPT-2: token + learned position embeddings, n_layer pre-LN blocks, final LN, tied head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V, dt = cfg.d_model, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
        self.wte = _param(rngs, (V, D), ("vocab", "embed"), 0.02, dtype=dt)
        self.wpe = _param(rngs, (cfg.positions, D), ("positions", "embed"), 0.01, dtype=dt)
        self.blocks = Blocks(cfg, rngs)
        self.ln_f_scale = _param(rngs, (D,), ("embed",), None, 1.0, dt)
        self.ln_f_bias = _param(rngs, (D,), ("embed",), None, 0.0, dt)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), 0.02, dtype=dt)

    def hidden(self, tokens_BT: jax.Array, key=None) -> jax.Array:
        """Final-layer-normed hidden states [B, T, D] in the compute dtype."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        T = tokens_BT.shape[1]
        # Gather from a whole (all-gathered) table, as FSDP does for every weight: a gather
        # from a table sharded on vocab or embed makes XLA rematerialise it in full on meshes
        # where data and fsdp are both > 1 ("Involuntary full rematerialization").
        table = constrain(self.wte[...], (None, None))
        x = jnp.take(table, tokens_BT, axis=0) + self.wpe[...][:T]
        x = constrain(x.astype(dt), ("batch", "seq", "embed"))
        keys = None
        if key is not None and cfg.dropout > 0:
            key, embed_key = jax.random.split(key)
            x = _dropout(x, cfg.dropout, embed_key)
            keys = jax.random.split(key, cfg.n_layer)

        stacked = nnx.to_pure_dict(nnx.state(self.blocks, nnx.Param))
        body = lambda x, p_key: (block(p_key[0], x, cfg, p_key[1]), None)
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (stacked, keys))
        else:
            for i in range(cfg.n_layer):
                layer = jax.tree.map(lambda a, i=i: a[i], stacked)
                x, _ = body(x, (layer, None if keys is None else keys[i]))
        return layer_norm(x, self.ln_f_scale[...], self.ln_f_bias[...], dt)

    def head(self) -> jax.Array:
        """The output projection [V, D] (the token table when embeddings are tied)."""
        if self.cfg.tie_embeddings:
            return self.wte[...]
        return self.lm_head[...].T

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        w = self.head().astype(h_BTD.dtype)
        out = jnp.einsum("btd,vd->btv", h_BTD, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "vocab"))

    def __call__(self, tokens_BT: jax.Array, key=None) -> jax.Array:
        """Logits [B, T, V] in f32."""
        return self.logits(self.hidden(tokens_BT, key))


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameter state as shapes only (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, state


def init_params(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """Freshly initialised parameters as a pure dict of arrays (jit this with out_shardings)."""
    with nnx.use_eager_sharding(False):
        model = GPT(cfg, nnx.Rngs(params=seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_params(params: dict[str, Any]) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
