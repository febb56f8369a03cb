"""The GPT-2 architecture in Flax NNX, layers stacked and run with `lax.scan`.

Every parameter carries logical axis names (`out_sharding` metadata); the model knows no mesh.
Shapes use B batch, T sequence, D d_model, N heads, H head_dim, F d_ff, V vocab, L layers.
Parameters are kept in `param_dtype` (f32); matmuls run in `dtype` (bf16 or f32); layer norms,
softmax statistics and logits are f32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.core import platform
from gptjax.core.loss import logits as logits_of
from gptjax.core.sharding import constrain

LN_EPS = 1e-5  # GPT-2's layer-norm epsilon

REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(
    rngs: nnx.Rngs,
    shape,
    names,
    std: float | None,
    fill: float = 0.0,
    dtype=jnp.float32,
    *,
    decay: bool,
    embedding: str | None = None,
):
    """A parameter of `shape`: normal(std) or constant `fill`, with its facts declared here:

    `names` its logical axes (sharding), `decay` whether AdamW decays it, `embedding` "token" or
    "position" for the embedding tables (left out of the non-embedding parameter count N).
    """
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names), decay=decay, embedding=embedding)


class Blocks(nnx.Module):
    """All n_layer transformer blocks, each parameter stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, N, H, F = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ff
        dt = jnp.dtype(cfg.param_dtype)
        residual_std = 0.02 / math.sqrt(2 * L)  # GPT-2: scale residual projections
        norm = ("layers", "embed")
        # attention
        self.ln1_scale = _param(rngs, (L, D), norm, None, 1.0, dt, decay=False)
        self.ln1_bias = _param(rngs, (L, D), norm, None, 0.0, dt, decay=False)
        self.qkv_w = _param(
            rngs, (L, D, 3, N, H), ("layers", "embed", "qkv", "heads", "head_dim"), 0.02, 0, dt,
            decay=True,
        )  # fmt: skip
        self.qkv_b = _param(
            rngs, (L, 3, N, H), ("layers", "qkv", "heads", "head_dim"), None, 0, dt, decay=False
        )
        self.out_w = _param(
            rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), residual_std, 0, dt,
            decay=True,
        )  # fmt: skip
        self.out_b = _param(rngs, (L, D), norm, None, 0.0, dt, decay=False)
        # MLP
        self.ln2_scale = _param(rngs, (L, D), norm, None, 1.0, dt, decay=False)
        self.ln2_bias = _param(rngs, (L, D), norm, None, 0.0, dt, decay=False)
        self.fc_w = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), 0.02, 0, dt, decay=True)
        self.fc_b = _param(rngs, (L, F), ("layers", "mlp"), None, 0.0, dt, decay=False)
        self.proj_w = _param(
            rngs, (L, F, D), ("layers", "mlp", "embed"), residual_std, 0, dt, decay=True
        )
        self.proj_b = _param(rngs, (L, D), norm, None, 0.0, dt, decay=False)


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
    """The attention implementation for `model.attention`. `steps.build` has already resolved
    `auto` for the devices the step is built for (gptjax/core/platform.py); a model used on its
    own resolves it for the default backend's devices."""
    if setting != "auto":
        return setting
    return platform.attention(setting, dtype, platform.platform_of(jax.devices()))


# --- the KV cache -------------------------------------------------------------------------------
# A static cache of S slots per row, filled left to right by `GPT.extend`:
#   k, v         [L, B, N, S, H]  keys and values of every layer (compute dtype); heads before
#                                 slots, so one new token's attention reads them in place
#   segment_ids  [B, S]           the segment of the token in each slot (0: padding or empty)
#   index        []               the next slot to write (the same for every row)
# A query attends to the slots at or before its own whose segment equals its own, so rows of
# different lengths share one cache when their prompts are left-padded with segment 0.

CACHE_AXES = {
    "k": ("layers", "batch", "heads", "seq", "head_dim"),
    "v": ("layers", "batch", "heads", "seq", "head_dim"),
    "segment_ids": ("batch", "seq"),
    "index": (),
}


def init_cache(cfg: ModelConfig, batch: int, slots: int | None = None) -> dict[str, jax.Array]:
    """An empty cache of `slots` (default seq_len) positions for `batch` rows."""
    S = slots or cfg.seq_len
    shape = (cfg.n_layer, batch, cfg.n_head, S, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, cfg.dtype),
        "v": jnp.zeros(shape, cfg.dtype),
        "segment_ids": jnp.zeros((batch, S), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


# --- one block: attention, then the MLP ---------------------------------------------------------


class Context(NamedTuple):
    """Where the tokens of a call sit: what attention needs besides the activations.

    `positions` [B, T] (GPT-2 adds its learned positions at the embedding; a rotary variant
    would read them in attention), `segment_ids` [B, T] (None: one causal sequence, the fast
    path), and for a cached call the `index` of the first new slot and the cache's
    `cache_segments` [B, S].
    """

    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    index: jax.Array | None = None
    cache_segments: jax.Array | None = None


def attention(p, h_BTD, cfg: ModelConfig, where: Context, kv=None):
    """Multi-head causal self-attention. `kv` = (k, v, layer): the whole cache's keys and
    values [L, B, N, S, H] and this layer's index, or None; returns (output [B, T, D], the
    updated whole-cache (k, v) or None). The new keys and values are written in place (one slice of
    the whole cache), so a decode step moves no more of the cache than attention reads."""
    dt = jnp.dtype(cfg.dtype)
    qkv = jnp.einsum("btd,dcnh->btcnh", h_BTD, p["qkv_w"]) + p["qkv_b"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    if kv is not None:  # write the new keys and values at slots index..index+T-1
        k_all, v_all, layer = kv
        at = (layer, 0, 0, where.index, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k.swapaxes(1, 2)[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v.swapaxes(1, 2)[None].astype(v_all.dtype), at)
        k_all = constrain(k_all, CACHE_AXES["k"])
        v_all = constrain(v_all, CACHE_AXES["v"])
        kv = (k_all, v_all)
        k = constrain(k_all[layer], CACHE_AXES["k"][1:])
        v = constrain(v_all[layer], CACHE_AXES["v"][1:])
        T, S = q.shape[1], k.shape[2]
        q_slot = where.index + jnp.arange(T)
        mask = q_slot[:, None] >= jnp.arange(S)[None, :]  # causal, by slot
        same = where.segment_ids[:, :, None] == where.cache_segments[:, None, :]
        a = _cached_attention(q, k, v, mask[None] & same)
    elif where.segment_ids is not None:  # packed documents never see each other
        T = q.shape[1]
        causal = jnp.tril(jnp.ones((T, T), bool))
        same = where.segment_ids[:, :, None] == where.segment_ids[:, None, :]
        mask = (causal[None] & same)[:, None]
        a = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    else:
        a = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=attention_impl(cfg.attention, dt)
        )
    return jnp.einsum("btnh,nhd->btd", a, p["out_w"]) + p["out_b"], kv


def _cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS):
    """Attention of T new tokens over the cache's S slots. Written as two einsums on the
    cache's [B, N, S, H] layout: for one new token each is a matrix-vector product per (row,
    head) that reads the cache once, in place (5x faster on a CPU than transposing the cache
    for `dot_product_attention`). Scores and softmax in f32."""
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
    scores = jnp.einsum("btnh,bnsh->bnts", q_BTNH, k_BNSH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None], scores * scale, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(v_BNSH.dtype)
    return jnp.einsum("bnts,bnsh->btnh", weights, v_BNSH)


def mlp(p, h_BTD, cfg: ModelConfig):
    """The position-wise MLP: D -> F (GELU, tanh form as GPT-2) -> D."""
    del cfg
    h = jnp.einsum("btd,df->btf", h_BTD, p["fc_w"]) + p["fc_b"]
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fd->btd", h, p["proj_w"]) + p["proj_b"]


def block(p: dict[str, jax.Array], x_BTD, cfg: ModelConfig, where: Context, kv=None, key=None):
    """One pre-LayerNorm GPT-2 block on one layer's parameters `p` (no layers axis).

    `kv`: (k, v, layer) as for attention(). Returns (x [B, T, D], the updated whole-cache
    (k, v), or None without a cache)."""
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(key, 2) if key is not None else (None, None)
    cast = {name: value.astype(dt) for name, value in p.items()}

    h = layer_norm(x_BTD, p["ln1_scale"], p["ln1_bias"], dt)
    a, kv = attention(cast, h, cfg, where, kv)
    x_BTD = x_BTD + _dropout(a, cfg.dropout, keys[0])
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))

    h = layer_norm(x_BTD, p["ln2_scale"], p["ln2_bias"], dt)
    x_BTD = x_BTD + _dropout(mlp(cast, h, cfg), cfg.dropout, keys[1])
    return constrain(x_BTD, ("batch", "seq", "embed")), kv


class GPT(nnx.Module):
    """GPT-2: token + learned position embeddings, n_layer pre-LN blocks, final LN, tied head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V, dt = cfg.d_model, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
        self.wte = _param(
            rngs, (V, D), ("vocab", "embed"), 0.02, 0, dt, decay=True, embedding="token"
        )
        self.wpe = _param(
            rngs, (cfg.positions, D), ("positions", "embed"), 0.01, 0, dt,
            decay=True, embedding="position",
        )  # fmt: skip
        self.blocks = Blocks(cfg, rngs)
        self.ln_f_scale = _param(rngs, (D,), ("embed",), None, 1.0, dt, decay=False)
        self.ln_f_bias = _param(rngs, (D,), ("embed",), None, 0.0, dt, decay=False)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), 0.02, 0, dt, decay=True)

    def _embed(self, tokens_BT, positions_BT):
        cfg = self.cfg
        # Gather from a whole (all-gathered) table, as FSDP does for every weight: a gather
        # from a table sharded on vocab or embed makes XLA rematerialise it in full on meshes
        # where data and fsdp are both > 1 ("Involuntary full rematerialization").
        table = constrain(self.wte[...], (None, None))
        x = jnp.take(table, tokens_BT, axis=0)
        if positions_BT is None:  # 0..T-1: a slice (the pretraining fast path)
            x = x + self.wpe[...][: tokens_BT.shape[1]]
        else:
            x = x + jnp.take(constrain(self.wpe[...], (None, None)), positions_BT, axis=0)
        return constrain(x.astype(cfg.dtype), ("batch", "seq", "embed"))

    def _layers(self, x, where: Context, cache=None, key=None):
        """Run every block (scanned or unrolled); returns (x, the updated cache's (k, v)).

        The cache travels with the activations (the loop's carry) and each layer writes its
        new keys and values into it in place."""
        cfg = self.cfg
        keys = None
        if key is not None and cfg.dropout > 0:
            key, embed_key = jax.random.split(key)
            x = _dropout(x, cfg.dropout, embed_key)
            keys = jax.random.split(key, cfg.n_layer)
        stacked = nnx.to_pure_dict(nnx.state(self.blocks, nnx.Param))
        kv = None if cache is None else (cache["k"], cache["v"])

        def body(carry, layer):
            x, kv = carry
            p, layer_key, index = layer
            x, kv = block(p, x, cfg, where, None if kv is None else (*kv, index), layer_key)
            return (x, kv), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            layers = jnp.arange(cfg.n_layer)
            (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, keys, layers))
            return x, kv
        for i in range(cfg.n_layer):
            pick = lambda tree, i=i: None if tree is None else jax.tree.map(lambda a: a[i], tree)
            (x, kv), _ = body((x, kv), (pick(stacked), pick(keys), i))
        return x, kv

    def hidden(self, tokens_BT, key=None, *, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        """Final-layer-normed hidden states [B, T, D] in the compute dtype (training, eval).

        `positions_BT` None means 0..T-1; `segment_ids_BT` None means one causal sequence per
        row; with segment ids, attention stays inside each segment."""
        cfg = self.cfg
        x = self._embed(tokens_BT, positions_BT)
        x, _ = self._layers(x, Context(positions_BT, segment_ids_BT), key=key)
        return layer_norm(x, self.ln_f_scale[...], self.ln_f_bias[...], cfg.dtype)

    def extend(self, tokens_BT, positions_BT, cache, segment_ids_BT=None, *, last_only=False):
        """Append T tokens to the KV cache (prefill: the prompt; decode: T=1) and return
        (logits [B, T, V] f32, the updated cache). `segment_ids_BT` defaults to 1 (0 marks
        left padding that nothing attends to). `last_only`: logits of the last token only
        ([B, 1, V]; a prefill needs no more, and the head is most of its work)."""
        cfg = self.cfg
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        index = cache["index"]
        segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BT, (0, index))
        where = Context(positions_BT, segment_ids_BT, index, segments)
        x = self._embed(tokens_BT, positions_BT)
        x, (k, v) = self._layers(x, where, cache)
        if last_only:
            x = x[:, -1:]
        h = layer_norm(x, self.ln_f_scale[...], self.ln_f_bias[...], cfg.dtype)
        new_cache = {"k": k, "v": v, "segment_ids": segments, "index": index + tokens_BT.shape[1]}
        return self.logits(h), new_cache

    def head(self) -> jax.Array:
        """The output projection [V, D] (the token table when embeddings are tied)."""
        if self.cfg.tie_embeddings:
            return self.wte[...]
        return self.lm_head[...].T

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] in f32; padded vocabulary ids (model.vocab_valid) are -inf."""
        return logits_of(h_BTD, self.head(), self.cfg.vocab)

    def __call__(self, tokens_BT, key=None, *, positions_BT=None, segment_ids_BT=None):
        """Logits [B, T, V] in f32 (see `hidden`)."""
        h = self.hidden(tokens_BT, key, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        return self.logits(h)


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


def declared(abstract_state: nnx.State, fact: str) -> dict[str, Any]:
    """A pure-dict tree of one declared fact (`decay`, `embedding`, ...) of every parameter."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    values = jax.tree.map(
        lambda v: v.replace(v.get_metadata().get(fact)), abstract_state, is_leaf=is_var
    )
    return nnx.to_pure_dict(values)


@functools.cache
def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{"blocks.qkv_w": shape, ...} from the model's own definition (nothing allocated)."""
    _, state = abstract(cfg)
    shapes = nnx.to_pure_dict(state)
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


@functools.cache
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the model's shapes: total, without the embedding tables (Kaplan's
    N), and the position table alone."""
    _, state = abstract(cfg)
    sizes = jax.tree.leaves(jax.tree.map(lambda x: math.prod(x.shape), nnx.to_pure_dict(state)))
    kinds = jax.tree.leaves(declared(state, "embedding"), is_leaf=lambda x: x is None)
    total = sum(sizes)
    embedding = sum(n for n, kind in zip(sizes, kinds, strict=True) if kind is not None)
    position = sum(n for n, kind in zip(sizes, kinds, strict=True) if kind == "position")
    return {"params": total, "non_embedding_params": total - embedding, "position_params": position}


def count_params(params: dict[str, Any]) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
