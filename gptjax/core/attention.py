"""Causal self-attention for every block option, and the KV cache it reads in generation.

Shapes: B batch, T new tokens, S cache slots, R ring slots, N query heads, K key/value heads
(N / K queries share one: grouped-query attention), G = N / K, H head_dim.

One function, `attention`, covers every family: fused or grouped projections, optional
biases, qk-norm, rotary positions (with linear / Llama-3 / YaRN frequency scaling), a dense or a
sliding-window (`local:W`: a query sees itself and the W-1 tokens before it) pattern, the score
scale, and attention sinks (a learned logit per head added to every softmax's denominator).
Training without sinks or segments goes through `jax.nn.dot_product_attention` (cuDNN flash on
NVIDIA GPUs in bf16, with GQA and the window; XLA elsewhere); sinks, packed segments and the
cache take the explicit-score path (`_attend`, XLA).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig
from gptjax.core import platform
from gptjax.core.sharding import constrain

NEG = -1e30  # the masked score (finite: a row with nothing to see stays NaN-free)


def attention_impl(setting: str, dtype) -> str:
    """The attention implementation for `model.attention`. `steps.build` has already resolved
    `auto` for the devices the step is built for (gptjax/core/platform.py); a model used on its
    own resolves it for the default backend's devices."""
    if setting != "auto":
        return setting
    return platform.attention(setting, dtype, platform.platform_of(jax.devices()))


# --- rotary positions ---------------------------------------------------------------------------


@functools.cache
def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H/2] f32, the factor cos and sin are scaled by) of `cfg`'s RoPE.

    Pairs are (i, i + H/2) of each head (the "rotate half" layout of GPT-NeoX and Llama in
    transformers). The base frequencies are theta^(-2i/H) in f32, as transformers computes them."""
    H = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv, 1.0
    if s.type == "linear":
        return (inv / s.factor).astype(np.float32), 1.0
    if s.type == "llama3":  # long wavelengths interpolated, short kept, a smooth blend between
        wavelength = 2 * np.pi / inv
        low_edge = s.original_max_position / s.low_freq_factor  # longer: divided by factor
        high_edge = s.original_max_position / s.high_freq_factor  # shorter: kept
        blend = (s.original_max_position / wavelength - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        mixed = (1 - blend) * inv / s.factor + blend * inv
        out = np.where(wavelength > low_edge, inv / s.factor, inv)
        out = np.where((wavelength >= high_edge) & (wavelength <= low_edge), mixed, out)
        return out.astype(np.float32), 1.0

    # yarn: dimensions rotating fewer than beta_slow times over the original context are
    # interpolated, more than beta_fast times kept, a linear ramp between
    def dimension_of(rotations):
        return (H * math.log(s.original_max_position / (rotations * 2 * math.pi))) / (
            2 * math.log(cfg.rope_theta)
        )

    low, high = dimension_of(s.beta_fast), dimension_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(H // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: interpolated
    out = (inv / s.factor) * (1 - keep) + inv * keep
    factor = s.attention_factor
    if factor is None:
        factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return out.astype(np.float32), float(factor)


def apply_rope(x_BTNH, positions_BT, cfg: ModelConfig):
    """Rotate each head's (i, i + H/2) pairs by position · frequency_i (f32, back to x's dtype)."""
    inv, factor = rope_frequencies(cfg)
    angle = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [B, T, H/2]
    cos = (jnp.cos(angle) * factor)[:, :, None]
    sin = (jnp.sin(angle) * factor)[:, :, None]
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def rms_norm(x, scale, eps: float):
    """x / rms(x) · scale over the last axis, in f32, back to x's dtype."""
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


# --- the KV cache -------------------------------------------------------------------------------
# A static cache of S slots per row, filled left to right by `GPT.extend`. The layers are
# grouped by their place j in model.attention_pattern (P entries, L/P layers each):
#   k[j], v[j]   [L/P, B, K, S_j, H]  keys and values (compute dtype); heads before slots, so one
#                                     new token's attention reads them in place. Dense layers
#                                     keep every slot (S_j = S); a `local:W` layer keeps a ring
#                                     of S_j = min(W, S) slots: slot s lives at s mod S_j
#   segment_ids  [B, S]               the segment of the token in each slot (0: padding, empty)
#   index        []                   the next slot to write (the same for every row), or
#                [B]                  one per row (the serving engine's slots: each row's tokens
#                                     fill its own slots from 0, whatever the others hold)
# A query attends to the slots at or before its own whose segment equals its own (and, for a
# local layer, fewer than W slots back), so rows of different lengths share one cache when their
# prompts are left-padded with segment 0: within a row, slot distance is token distance.

CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "segment_ids": ("batch", "seq"),
    "index": (),
}


def cache_slots(cfg: ModelConfig, slots: int) -> list[int]:
    """Slots kept by each place of the attention pattern in a cache of `slots` positions."""
    return [
        slots if w is None else min(w, slots) for w in cfg.windows()[: len(cfg.attention_pattern)]
    ]


def init_cache(cfg: ModelConfig, batch: int, slots: int | None = None) -> dict:
    """An empty cache of `slots` (default seq_len) positions for `batch` rows."""
    S = slots or cfg.seq_len
    groups = cfg.n_layer // len(cfg.attention_pattern)
    shapes = [(groups, batch, cfg.kv_heads, s, cfg.head_dim) for s in cache_slots(cfg, S)]
    return {
        "k": tuple(jnp.zeros(shape, cfg.dtype) for shape in shapes),
        "v": tuple(jnp.zeros(shape, cfg.dtype) for shape in shapes),
        "segment_ids": jnp.zeros((batch, S), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def constrain_cache(cache: dict) -> dict:
    return {
        name: jax.tree.map(lambda a, n=name: constrain(a, CACHE_AXES[n]), value)
        for name, value in cache.items()
    }


def grow_cache(cfg: ModelConfig, cache: dict, slots: int) -> dict:
    """The same cache with room for `slots` positions (empty slots appended). A ring grows only
    while the cache holds no more tokens than the ring's old size (right after a prefill), where
    slot s sits at s mod R for the old size and the new one alike."""
    pad = lambda a, n: jnp.pad(a, [(0, 0)] * 3 + [(0, n - a.shape[3]), (0, 0)])
    targets = cache_slots(cfg, slots)
    return {
        "k": tuple(pad(a, n) for a, n in zip(cache["k"], targets, strict=True)),
        "v": tuple(pad(a, n) for a, n in zip(cache["v"], targets, strict=True)),
        "segment_ids": jnp.pad(
            cache["segment_ids"], ((0, 0), (0, slots - cache["segment_ids"].shape[1]))
        ),
        "index": cache["index"],
    }


def shift_cache(cache: dict, shift) -> dict:
    """Every slot s moved to s - shift (the first `shift` slots dropped): dense caches and rings
    alike roll left by `shift` (a ring's slot s sits at s mod R, so it rolls by shift mod R)."""
    roll = lambda a: jnp.roll(a, -shift, axis=3)
    return {
        "k": tuple(roll(a) for a in cache["k"]),
        "v": tuple(roll(a) for a in cache["v"]),
        "segment_ids": jnp.roll(cache["segment_ids"], -shift, axis=1),
        "index": cache["index"] - shift,
    }


def cache_bytes_per_token(cfg: ModelConfig, slots: int | None = None) -> float:
    """Bytes of keys and values one row's token costs in a full cache of `slots` positions
    (default seq_len), averaged over the slots: 2 · K · H · itemsize per kept layer slot."""
    S = slots or cfg.seq_len
    groups = cfg.n_layer // len(cfg.attention_pattern)
    kept = groups * sum(cache_slots(cfg, S))
    return 2 * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize * kept / S


# --- attention ----------------------------------------------------------------------------------


class Context(NamedTuple):
    """Where the tokens of a call sit: what attention needs besides the activations.

    `positions` [B, T] (None: 0..T-1; learned positions are added at the embedding, rotary ones
    here), `segment_ids` [B, T] (None: one causal sequence, the fast path), and for a cached
    call the `index` of the first new slot and the cache's `cache_segments` [B, S].
    """

    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    index: jax.Array | None = None
    cache_segments: jax.Array | None = None


def project(p, h_BTD, cfg: ModelConfig):
    """Queries [B, T, N, H] and keys, values [B, T, K, H]: one fused [D, 3, N, H] weight when
    K = N (GPT-2's layout), a [D, N, H] and a [D, 2, K, H] one with grouped heads."""
    if "qkv_w" in p:
        qkv = jnp.einsum("btd,dcnh->btcnh", h_BTD, p["qkv_w"])
        if "qkv_b" in p:
            qkv = qkv + p["qkv_b"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = jnp.einsum("btd,dnh->btnh", h_BTD, p["q_w"])
        kv = jnp.einsum("btd,dckh->btckh", h_BTD, p["kv_w"])
        if "q_b" in p:
            q, kv = q + p["q_b"], kv + p["kv_b"]
        k, v = kv[:, :, 0], kv[:, :, 1]
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    return q, k, v


def score_scale(cfg: ModelConfig) -> float:
    return cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(cfg.head_dim)


def _attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS, scale: float, sinks_N=None):
    """Attention of T queries over S keys with an explicit mask; scores and softmax in f32.
    Grouped heads without copying keys (query heads n = k·G + g share key head k). For one new
    token each einsum is a matrix-vector product per (row, head) that reads the cache in place
    (with the cache carried through the layers, 4× faster per decode step at batch 8 on a CPU
    than transposing it for `dot_product_attention`: docs/generation.md). A sink adds
    exp(sink) to each softmax's denominator (a column of the scores that nothing reads)."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_BKSH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores * scale, NEG)
    if sinks_N is None:
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(
            sinks_N.astype(jnp.float32).reshape(1, K, N // K, 1, 1), (*scores.shape[:-1], 1)
        )
        weights = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bksh->btkgh", weights.astype(v_BKSH.dtype), v_BKSH)
    return out.reshape(B, T, N, H)


def _window_mask(q_slot, k_slot, window):
    """Causal (key at or before the query) and, for a local layer, fewer than `window` back."""
    mask = q_slot[..., :, None] >= k_slot[..., None, :]
    if window is not None:
        mask = mask & (q_slot[..., :, None] - k_slot[..., None, :] < window)
    return mask


def attention(p, h_BTD, cfg: ModelConfig, where: Context, window: int | None, kv=None):
    """Causal self-attention of one layer (`window`: None dense, W local). `kv` = (k, v, group):
    this pattern place's cache [L/P, B, K, S_j, H] and the layer's index in it, or None; returns
    (output [B, T, D], the updated (k, v) or None)."""
    dt = jnp.dtype(cfg.dtype)
    q, k, v = project(p, h_BTD, cfg)
    if cfg.positions == "rope":
        positions = where.positions
        if positions is None:
            positions = jnp.arange(q.shape[1])[None]
        q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    scale, sinks = score_scale(cfg), p.get("sinks")
    if kv is not None:
        a, kv = _cached(q, k, v, where, window, kv, scale, sinks)
    elif where.segment_ids is not None or sinks is not None:
        T = q.shape[1]
        slot = jnp.arange(T)
        mask = _window_mask(slot, slot, window)[None]
        if where.segment_ids is not None:  # packed documents never see each other
            mask = mask & (where.segment_ids[:, :, None] == where.segment_ids[:, None, :])
        a = _attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, scale, sinks)
    else:
        a = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=attention_impl(cfg.attention, dt),
        )  # fmt: skip
    out = jnp.einsum("btnh,nhd->btd", a, p["out_w"])
    if "out_b" in p:
        out = out + p["out_b"]
    return out, kv


def _cached(q, k, v, where: Context, window, kv, scale, sinks):
    """The cached call: T new tokens at slots index..index+T-1 over what the cache holds.

    A dense layer writes its new keys and values in place (one slice of the whole cache, so a
    decode step moves no more of it than attention reads) and attends over all S slots. A local
    layer attends over its ring (the R slots before index) and the new keys together, then keeps
    the last min(T, R) new ones in the ring."""
    k_all, v_all, group = kv
    if jnp.ndim(where.index):
        return _cached_rows(q, k, v, where, window, kv, scale, sinks)
    T, R = q.shape[1], k_all.shape[3]
    index = where.index
    q_slot = index + jnp.arange(T)
    k_new, v_new = k.swapaxes(1, 2).astype(k_all.dtype), v.swapaxes(1, 2).astype(v_all.dtype)
    if window is None:
        at = (group, 0, 0, index, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k_new[None], at)
        v_all = jax.lax.dynamic_update_slice(v_all, v_new[None], at)
        keys, values = k_all[group], v_all[group]
        k_slot, k_segments = jnp.arange(R), where.cache_segments
        valid = True
    else:
        r = jnp.arange(R)
        held = index - 1 - jnp.mod(index - 1 - r, R)  # the slot ring place r holds
        k_slot = jnp.concatenate([held, q_slot])
        valid = jnp.concatenate([held >= 0, jnp.ones(T, bool)])
        ring_segments = jnp.take(where.cache_segments, jnp.maximum(held, 0), axis=1)
        k_segments = jnp.concatenate([ring_segments, where.segment_ids], axis=1)
        keys = jnp.concatenate([k_all[group], k_new], axis=2)
        values = jnp.concatenate([v_all[group], v_new], axis=2)
        keep = min(T, R)  # the newest `keep` tokens go into the ring
        places = jnp.mod(index + T - keep + jnp.arange(keep), R)
        if keep == 1:
            at = (group, 0, 0, places[0], 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k_new[None, :, :, -1:], at)
            v_all = jax.lax.dynamic_update_slice(v_all, v_new[None, :, :, -1:], at)
        else:
            ring_k = k_all[group].at[:, :, places].set(k_new[:, :, T - keep :])
            ring_v = v_all[group].at[:, :, places].set(v_new[:, :, T - keep :])
            k_all = jax.lax.dynamic_update_slice(k_all, ring_k[None], (group, 0, 0, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, ring_v[None], (group, 0, 0, 0, 0))
    k_all = constrain(k_all, CACHE_AXES["k"])
    v_all = constrain(v_all, CACHE_AXES["v"])
    keys = constrain(keys, CACHE_AXES["k"][1:])
    values = constrain(values, CACHE_AXES["v"][1:])
    mask = _window_mask(q_slot, k_slot, window) & valid
    mask = mask[None] & (where.segment_ids[:, :, None] == k_segments[:, None, :])
    return _attend(q, keys, values, mask, scale, sinks), (k_all, v_all)


def _cached_rows(q, k, v, where: Context, window, kv, scale, sinks):
    """`_cached` with one write slot per row (`where.index` [B]): the T new tokens of row b go
    to its slots index[b]..index[b]+T-1 (a ring's at those slots mod R), written in place. Row
    b's keys sit where its own history put them, so its attention is the same whatever the other
    rows hold."""
    k_all, v_all, group = kv
    B, T, R = q.shape[0], q.shape[1], k_all.shape[3]
    index = where.index[:, None]  # [B, 1]
    q_slot = index + jnp.arange(T)  # [B, T]
    k_new, v_new = k.astype(k_all.dtype), v.astype(v_all.dtype)  # [B, T, K, H]
    rows = jnp.arange(B)[:, None]
    if window is None:
        places, kept = q_slot, slice(None)
    else:
        r = jnp.arange(R)[None]
        held = index - 1 - jnp.mod(index - 1 - r, R)  # [B, R]: the slot ring place r holds
        k_slot = jnp.concatenate([held, q_slot], axis=1)
        valid = jnp.concatenate([held >= 0, jnp.ones((B, T), bool)], axis=1)
        ring_segments = jnp.take_along_axis(where.cache_segments, jnp.maximum(held, 0), axis=1)
        k_segments = jnp.concatenate([ring_segments, where.segment_ids], axis=1)
        keys = jnp.concatenate([k_all[group], k_new.swapaxes(1, 2)], axis=2)
        values = jnp.concatenate([v_all[group], v_new.swapaxes(1, 2)], axis=2)
        keep = min(T, R)  # the newest `keep` tokens go into the ring
        places, kept = jnp.mod(q_slot[:, T - keep :], R), slice(T - keep, None)
    # [group, rows, :, places, :] selects [B, T', K, H] (the advanced indices' axes first)
    k_all = k_all.at[group, rows, :, places].set(k_new[:, kept])
    v_all = v_all.at[group, rows, :, places].set(v_new[:, kept])
    k_all = constrain(k_all, CACHE_AXES["k"])
    v_all = constrain(v_all, CACHE_AXES["v"])
    if window is None:
        keys, values = k_all[group], v_all[group]
        k_slot, k_segments = jnp.broadcast_to(jnp.arange(R), (B, R)), where.cache_segments
        valid = jnp.ones((B, R), bool)
    mask = _window_mask(q_slot, k_slot, window) & valid[:, None, :]
    mask = mask & (where.segment_ids[:, :, None] == k_segments[:, None, :])
    return _attend(q, keys, values, mask, scale, sinks), (k_all, v_all)
