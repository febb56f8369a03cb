"""The GPT family in Flax NNX: one block whose options are config keys, layers stacked and
run with `lax.scan`.

GPT-2's block is the default (pre-LayerNorm, learned positions, tanh-GELU MLP, dense multi-head
attention, biases everywhere, a final LayerNorm, tied head); the options (docs/models.md) choose
the norm and where it sits, the positions, grouped-query heads, biases, qk-norm, a per-layer
dense / sliding-window pattern, sinks, the score scale and the MLP. Every parameter carries
logical axis names (`out_sharding` metadata) and its weight decay, declared where it is created;
the model knows no mesh. Shapes use B batch, T sequence, D d_model, N heads, K key/value heads,
H head_dim, F d_ff, V vocab, L layers, P the attention pattern's length.
Parameters are kept in `param_dtype` (f32); matmuls run in `dtype` (bf16 or f32); norms,
softmax statistics and logits are f32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import REMATS, ModelConfig
from gptjax.core import attention as attn
from gptjax.core import expert_parallel, moe, quantize, vocab_loss
from gptjax.core.attention import (  # noqa: F401  (the cache, as callers know it)
    CACHE_AXES,
    Context,
    attention_impl,
    cache_bytes_per_token,
    constrain_cache,
    grow_cache,
    init_cache,
    shift_cache,
)
from gptjax.core.sharding import constrain

# model.remat (config.REMATS) other than "none": "full" saves nothing, the others are the
# jax.checkpoint policies of those names
REMAT_POLICIES = {
    name: None if name == "full" else getattr(jax.checkpoint_policies, name)
    for name in REMATS
    if name != "none"
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
    """All n_layer transformer blocks, each parameter stacked along a leading `layers` axis.
    A switched-off option creates no parameter (no bias, no position table, ...)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, N, K, H, F = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ff
        dt = jnp.dtype(cfg.param_dtype)
        residual_std = 0.02 / math.sqrt(2 * L)  # GPT-2: scale residual projections
        norm = ("layers", "embed")
        weight = lambda shape, names, std=0.02: _param(rngs, shape, names, std, 0, dt, decay=True)
        const = lambda shape, names, fill=0.0: _param(
            rngs, shape, names, None, fill, dt, decay=False
        )
        # attention
        self.ln1_scale = const((L, D), norm, 1.0)
        if cfg.norm == "layernorm":
            self.ln1_bias = const((L, D), norm)
        if K == N:  # GPT-2's fused layout
            self.qkv_w = weight((L, D, 3, N, H), ("layers", "embed", "qkv", "heads", "head_dim"))
            if cfg.qkv_bias:
                self.qkv_b = const((L, 3, N, H), ("layers", "qkv", "heads", "head_dim"))
        else:  # grouped heads: queries, and keys + values of K heads
            self.q_w = weight((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
            self.kv_w = weight((L, D, 2, K, H), ("layers", "embed", "qkv", "kv_heads", "head_dim"))
            if cfg.qkv_bias:
                self.q_b = const((L, N, H), ("layers", "heads", "head_dim"))
                self.kv_b = const((L, 2, K, H), ("layers", "qkv", "kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = const((L, H), ("layers", "head_dim"), 1.0)
            self.k_norm = const((L, H), ("layers", "head_dim"), 1.0)
        if cfg.attention_sinks:
            self.sinks = const((L, N), ("layers", "heads"))
        self.out_w = weight((L, N, H, D), ("layers", "heads", "head_dim", "embed"), residual_std)
        if cfg.attn_out_bias:
            self.out_b = const((L, D), norm)
        # MLP: the dense layers' MLPs stacked over the dense layers, the MoE layers' over the
        # MoE layers (model.moe; every layer is one or the other)
        self.ln2_scale = const((L, D), norm, 1.0)
        if cfg.norm == "layernorm":
            self.ln2_bias = const((L, D), norm)
        L_moe = sum(cfg.moe_layers())
        L = L - L_moe
        if L:
            self.fc_w = weight((L, D, F), ("layers", "embed", "mlp"))
            if cfg.mlp == "swiglu":
                self.gate_w = weight((L, D, F), ("layers", "embed", "mlp"))
            if cfg.mlp_bias:
                self.fc_b = const((L, F), ("layers", "mlp"))
                if cfg.mlp == "swiglu":
                    self.gate_b = const((L, F), ("layers", "mlp"))
            self.proj_w = weight((L, F, D), ("layers", "mlp", "embed"), residual_std)
            if cfg.mlp_bias:
                self.proj_b = const((L, D), norm)
        if L_moe:
            L, E, F = L_moe, cfg.moe.experts, cfg.expert_ff
            self.router_w = weight((L, D, E), ("layers", "embed", "router"))
            if cfg.moe.router_bias:
                self.router_b = const((L, E), ("layers", "router"))
            up = ("layers", "expert", "embed", "mlp")
            self.expert_up_w = weight((L, E, D, F), up)
            self.expert_gate_w = weight((L, E, D, F), up)
            down = ("layers", "expert", "mlp", "embed")
            self.expert_down_w = weight((L, E, F, D), down, residual_std)
            if cfg.moe.expert_bias:
                self.expert_up_b = const((L, E, F), ("layers", "expert", "mlp"))
                self.expert_gate_b = const((L, E, F), ("layers", "expert", "mlp"))
                self.expert_down_b = const((L, E, D), ("layers", "expert", "embed"))


def norm(x_BTD, scale_D, bias_D, cfg: ModelConfig):
    """LayerNorm (scale and bias) or RMSNorm (scale; `bias_D` None), in f32, to cfg.dtype."""
    x = x_BTD.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + cfg.norm_eps)
    else:
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    y = y * scale_D.astype(jnp.float32)
    if bias_D is not None:
        y = y + bias_D.astype(jnp.float32)
    return y.astype(cfg.dtype)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --- one block: attention, then the MLP ---------------------------------------------------------

# The dense MLP's parameters (stacked over the dense layers; model.moe's over the MoE layers)
DENSE_MLP = ("fc_w", "fc_b", "gate_w", "gate_b", "proj_w", "proj_b")

ACTIVATIONS = {
    "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),  # GPT-2's "gelu_new"
    "gelu": lambda h: jax.nn.gelu(
        h, approximate=False
    ),  # the exact erf form (GPT-2 configs with activation_function "gelu")
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),
}


def mlp(p, h_BTD, cfg: ModelConfig):
    """The position-wise MLP: D -> F (model.mlp's activation; swiglu: silu(gate) · up) -> D."""
    bias = lambda name: p[name] if name in p else 0
    h = jnp.einsum("btd,df->btf", h_BTD, p["fc_w"]) + bias("fc_b")
    if cfg.mlp == "swiglu":
        gate = jnp.einsum("btd,df->btf", h_BTD, p["gate_w"]) + bias("gate_b")
        h = jax.nn.silu(gate) * h
    else:
        h = ACTIVATIONS[cfg.mlp](h)
    h = constrain(h, ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fd->btd", h, p["proj_w"]) + bias("proj_b")


def block(
    p, x_BTD, cfg: ModelConfig, where: Context, window=None, kv=None, key=None, dropless=False
):
    """One block on one layer's parameters `p` (no layers axis): pre-norm x + f(norm(x)) or
    post-norm norm(x + f(x)), for attention (`window`: None dense, W local) then the MLP (the
    mixture of experts when `p` holds a router; `dropless` ignores its capacity).

    `kv`: (k, v, group) as for attention(). Returns (x [B, T, D], the updated (k, v), or None
    without a cache, the MoE layer's figures (moe.AUX_KEYS; zeros for a dense layer, {} in a
    dense model))."""
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(key, 2) if key is not None else (None, None)
    cast = {name: value.astype(dt) for name, value in p.items()}
    norm1 = lambda x: norm(x, p["ln1_scale"], p.get("ln1_bias"), cfg)
    norm2 = lambda x: norm(x, p["ln2_scale"], p.get("ln2_bias"), cfg)
    pre = cfg.norm_placement == "pre"

    a, kv = attn.attention(cast, norm1(x_BTD) if pre else x_BTD, cfg, where, window, kv)
    x_BTD = x_BTD + _dropout(a, cfg.dropout, keys[0])
    x_BTD = constrain(x_BTD if pre else norm1(x_BTD), ("batch", "seq", "embed"))

    h = norm2(x_BTD) if pre else x_BTD
    if "router_w" in p:
        router = {name: p[name] for name in ("router_w", "router_b") if name in p}  # kept f32
        sharded = expert_parallel.experts_sharded if expert_parallel.active() else None
        m, aux = moe.moe_mlp(cast | router, h, cfg, dropless=dropless, experts=sharded)
    else:
        m, aux = mlp(cast, h, cfg), moe.no_aux() if cfg.moe else {}
    x_BTD = x_BTD + _dropout(m, cfg.dropout, keys[1])
    return constrain(x_BTD if pre else norm2(x_BTD), ("batch", "seq", "embed")), kv, aux


class GPT(nnx.Module):
    """Token embeddings (+ learned positions), n_layer blocks, a final norm, the head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V, dt = cfg.d_model, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
        self.wte = _param(
            rngs, (V, D), ("vocab", "embed"), 0.02, 0, dt, decay=True, embedding="token"
        )
        if cfg.positions == "learned":
            self.wpe = _param(
                rngs, (cfg.n_positions, D), ("positions", "embed"), 0.01, 0, dt,
                decay=True, embedding="position",
            )  # fmt: skip
        self.blocks = Blocks(cfg, rngs)
        if cfg.final_norm:
            self.ln_f_scale = _param(rngs, (D,), ("embed",), None, 1.0, dt, decay=False)
            if cfg.norm == "layernorm":
                self.ln_f_bias = _param(rngs, (D,), ("embed",), None, 0.0, dt, decay=False)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), 0.02, 0, dt, decay=True)

    def _embed(self, tokens_BT, positions_BT):
        cfg = self.cfg
        # Gather from a whole (all-gathered) table, as FSDP does for every weight: a gather
        # from a table sharded on vocab or embed makes XLA rematerialise it in full on meshes
        # where data and fsdp are both > 1 ("Involuntary full rematerialization").
        table = constrain(self.wte[...], (None, None))
        x = quantize.take(table, tokens_BT)  # an int8 table (--quantize) too
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        if cfg.positions != "learned":
            pass
        elif positions_BT is None:  # 0..T-1: a slice (the pretraining fast path)
            x = x + self.wpe[...][: tokens_BT.shape[1]]
        else:
            x = x + jnp.take(constrain(self.wpe[...], (None, None)), positions_BT, axis=0)
        return constrain(x.astype(cfg.dtype), ("batch", "seq", "embed"))

    def _final_norm(self, x):
        cfg = self.cfg
        if not cfg.final_norm:
            return x.astype(cfg.dtype)
        bias = self.ln_f_bias[...] if cfg.norm == "layernorm" else None
        return norm(x, self.ln_f_scale[...], bias, cfg)

    def _layers(self, x, where: Context, cache=None, key=None):
        """Run every block; returns (x, the updated cache's (k, v) tuples, or None, the MoE
        figures summed over the layers ({} for a dense model)).

        The attention pattern's places have static windows and a layer's MLP is dense or the
        mixture of experts, so the scan runs over groups of Q consecutive layers, Q the shortest
        run repeating both (model.scan_group; Q = 1 for a uniform dense model: one layer a step).
        Dense-MLP and MoE parameters are stacked over their own layers, so a group's j-th layer
        takes the attention slice j and the MLP slice of its kind. The cache travels with the
        activations (the loop's carry) and each layer writes its new keys and values into it in
        place; every cached step routes its tokens dropless. Remat wraps each layer."""
        cfg = self.cfg
        P, Q = len(cfg.attention_pattern), cfg.scan_group
        windows = cfg.windows()[:Q]
        layout = cfg.moe_layers()[:Q]
        # a group's layer j: its place in its kind's stack within the group
        slot = [sum(layout[:j]) if layout[j] else j - sum(layout[:j]) for j in range(Q)]
        kind = lambda name: "moe" if name in moe.PARAMS else "dense" if name in DENSE_MLP else "all"
        width = {"all": Q, "moe": sum(layout), "dense": Q - sum(layout)}
        keys = None
        if key is not None and cfg.dropout > 0:
            key, embed_key = jax.random.split(key)
            x = _dropout(x, cfg.dropout, embed_key)
            keys = {"all": jax.random.split(key, cfg.n_layer)}
        stacked = nnx.to_pure_dict(nnx.state(self.blocks, nnx.Param))
        kv = None if cache is None else tuple(zip(cache["k"], cache["v"], strict=True))

        def layer(j, p_group, x, kv_j, group, keys_group):
            # Layer j's slices are taken inside the remat: taken outside, the forward scan would
            # save each layer's parameter slice for the backward pass, a stacked copy of every
            # block parameter (10 GiB per device for GPT-3 175B on 64 GPUs, fsdp 64).
            p = {
                name: a[j if kind(name) == "all" else slot[j]]
                for name, a in p_group.items()
                if kind(name) == "all" or (kind(name) == "moe") == layout[j]
            }
            layer_key = None if keys_group is None else keys_group["all"][j]
            return block(p, x, cfg, where, windows[j],
                         None if kv_j is None else (*kv_j, group), layer_key,
                         dropless=kv_j is not None)  # fmt: skip

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))

        def run_group(x, kv, aux, p_group, keys_group, group):
            # the cache holds layer g·Q + j at place j % P, entry (g·Q + j) // P
            kv = list(kv) if kv is not None else None
            for j in range(Q):
                place, entry = j % P, group * (Q // P) + j // P
                x, new, more = layer(
                    j, p_group, x, None if kv is None else kv[place], entry, keys_group
                )
                if kv is not None:
                    kv[place] = new
                aux = jax.tree.map(jnp.add, aux, more)
            return x, None if kv is None else tuple(kv), aux

        G = cfg.n_layer // Q
        split = lambda tree: None if tree is None else {
            name: a.reshape(G, width[kind(name)], *a.shape[1:]) for name, a in tree.items()
        }  # fmt: skip
        stacked, keys = split(stacked), split(keys)
        aux = moe.no_aux() if cfg.moe else {}
        if cfg.scan_layers:

            def body(carry, group):
                p_group, keys_group, index = group
                return run_group(*carry, p_group, keys_group, index), None

            (x, kv, aux), _ = jax.lax.scan(body, (x, kv, aux), (stacked, keys, jnp.arange(G)))
        else:
            for g in range(G):
                pick = lambda tree, g=g: (
                    None if tree is None else jax.tree.map(lambda a: a[g], tree)
                )
                x, kv, aux = run_group(x, kv, aux, pick(stacked), pick(keys), g)
        if kv is None:
            return x, None, aux
        return x, (tuple(k for k, _ in kv), tuple(v for _, v in kv)), aux

    def hidden(self, tokens_BT, key=None, *, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype (training, eval).

        `positions_BT` None means 0..T-1; `segment_ids_BT` None means one causal sequence per
        row; with segment ids, attention stays inside each segment."""
        return self.hidden_and_aux(
            tokens_BT, key, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT
        )[0]

    def hidden_and_aux(self, tokens_BT, key=None, *, positions_BT=None, segment_ids_BT=None):
        """(`hidden`, the MoE figures of moe.summarise: {} for a dense model)."""
        x = self._embed(tokens_BT, positions_BT)
        x, _, aux = self._layers(x, Context(positions_BT, segment_ids_BT), key=key)
        return self._final_norm(x), moe.summarise(aux, self.cfg)

    def extend(self, tokens_BT, positions_BT, cache, segment_ids_BT=None, *, last_only=False):
        """Append T tokens to the KV cache (prefill: the prompt; decode: T=1) and return
        (logits [B, T, V] f32, the updated cache). `segment_ids_BT` defaults to 1 (0 marks
        left padding that nothing attends to). `last_only`: logits of the last token only
        ([B, 1, V]; a prefill needs no more, and the head is most of its work)."""
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        index = cache["index"]
        if jnp.ndim(index):  # one write slot per row (attention.py's cache)
            B, T = tokens_BT.shape
            slots = index[:, None] + jnp.arange(T)
            segments = cache["segment_ids"].at[jnp.arange(B)[:, None], slots].set(segment_ids_BT)
        else:
            segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids_BT, (0, index)
            )
        where = Context(positions_BT, segment_ids_BT, index, segments)
        x = self._embed(tokens_BT, positions_BT)
        x, (k, v), _ = self._layers(x, where, cache)
        if last_only:
            x = x[:, -1:]
        h = self._final_norm(x)
        new_cache = {"k": k, "v": v, "segment_ids": segments, "index": index + tokens_BT.shape[1]}
        return self.logits(h), new_cache

    def head(self) -> jax.Array:
        """The output projection [V, D] (the token table when embeddings are tied)."""
        if self.cfg.tie_embeddings:
            return self.wte[...]
        return self.lm_head[...].T

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] in f32; padded vocabulary ids (model.vocab_valid) are -inf."""
        return vocab_loss.logits(h_BTD, self.head(), self.cfg.vocab, self.cfg.logit_softcap)

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


def param_name(path) -> str:
    """A parameter's dotted name ("blocks.qkv_w") from its pytree path: the one spelling of
    exports, plans, the parameter table and the shape checks."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def by_name(params: Any) -> dict[str, Any]:
    """{"blocks.qkv_w": leaf, ...}: the parameter tree's leaves by dotted name."""
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@functools.cache
def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{"blocks.qkv_w": shape, ...} from the model's own definition (nothing allocated)."""
    _, state = abstract(cfg)
    return {name: tuple(leaf.shape) for name, leaf in by_name(nnx.to_pure_dict(state)).items()}


@functools.cache
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the model's shapes: total, without the embedding tables (Kaplan's
    N), the embedding tables, the position table alone, the experts' weights (every parameter
    with an `expert` axis) and the active parameters (what one token uses: the experts' weights
    times top_k / experts, everything else, the router included, whole)."""
    _, state = abstract(cfg)
    sizes = jax.tree.leaves(jax.tree.map(lambda x: math.prod(x.shape), nnx.to_pure_dict(state)))
    kinds = jax.tree.leaves(declared(state, "embedding"), is_leaf=lambda x: x is None)
    axes = jax.tree.leaves(declared(state, "out_sharding"), is_leaf=lambda x: isinstance(x, tuple))
    total = sum(sizes)
    embedding = sum(n for n, kind in zip(sizes, kinds, strict=True) if kind is not None)
    position = sum(n for n, kind in zip(sizes, kinds, strict=True) if kind == "position")
    expert = sum(n for n, names in zip(sizes, axes, strict=True) if "expert" in names)
    active = total - expert + (expert * cfg.moe.top_k // cfg.moe.experts if cfg.moe else 0)
    return {
        "params": total,
        "non_embedding_params": total - embedding,
        "embedding_params": embedding,
        "position_params": position,
        "expert_params": expert,
        "active_params": active,
        "active_non_embedding_params": active - embedding,
    }


def count_params(params: dict[str, Any]) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
