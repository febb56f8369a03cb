"""int8 weights for inference: symmetric per-output-channel scales, dequantised inside the
jitted forward.

`quantize_params` turns each matmul weight of a parameter tree into an `Int8`: int8 `values` of
the weight's shape and f32 `scale`s of the same rank with the contracted (input) axes kept at
size 1, one scale per output channel: scale = max |w| over the channel's inputs / 127, values =
round(w / scale) in [-127, 127]. Everything else (norms, biases, the learned position table)
stays as it was. The model reads a weight through `astype` (the block casts each parameter to
the compute dtype), so an `Int8` is dequantised (values · scale) right where the weight is used:
inside the layer scan, one layer at a time, and for the tied token table (`take`: the embedding
rows, `astype`: the head).

What XLA:CPU makes of it (docs/compression.md): the convert and the scale fuse into one loop
that writes the layer's weight in the compute dtype, which the dot then reads; no XLA backend
here multiplies int8 weights directly into a float dot. The stored parameters (the programs'
arguments) shrink 4x for every quantised weight; a call's temporaries grow by one layer's
dequantised weights (and the head's).

Rounding error: |w - values · scale| <= scale / 2 per weight, so one output of x · W is off by at
most (scale_j / 2) · sum_i |x_i| (`matmul_error_bound`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

QUANTIZE = ("int8",)  # the --quantize choices besides none

# the weights quantised, by dotted name: the axes their matmul contracts (the input channels);
# every other axis is an output channel with its own scale. blocks.* carry a leading layers axis.
CONTRACTED = {
    "blocks.qkv_w": (1,),  # [L, D, 3, N, H]
    "blocks.q_w": (1,),  # [L, D, N, H]
    "blocks.kv_w": (1,),  # [L, D, 2, K, H]
    "blocks.out_w": (1, 2),  # [L, N, H, D]
    "blocks.fc_w": (1,),  # [L, D, F]
    "blocks.gate_w": (1,),  # [L, D, F]
    "blocks.proj_w": (1,),  # [L, F, D]
    "wte": (1,),  # [V, D]: a row per token (the embedding) = an output channel of the tied head
    "lm_head": (0,),  # [D, V]
}


@struct.dataclass
class Int8:
    """An int8 weight: `values` (int8) times `scale` (f32, the weight's rank, size 1 on the
    contracted axes). A pytree, so slicing the layers (tree maps, scans) slices both."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def T(self) -> Int8:  # noqa: N802  (as arrays spell it)
        return Int8(self.values.T, self.scale.T)

    def __getitem__(self, index) -> Int8:
        """nnx.Variable[...] (itself) or leading-axis indexing (a layer of the stack): the
        scales keep every axis but the contracted ones, so both index alike."""
        if index is Ellipsis:
            return self
        return Int8(self.values[index], self.scale[index])

    def reshape(self, *shape) -> Int8:
        """Split the leading (layers) axis: shape = (..., *self.shape[1:])."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        rest = self.ndim - 1
        if tuple(shape[len(shape) - rest :]) != self.shape[1:]:
            raise ValueError(f"an Int8 weight {self.shape} reshapes its leading axis only")
        lead = tuple(shape[: len(shape) - rest])
        return Int8(self.values.reshape(*lead, *self.shape[1:]),
                    self.scale.reshape(*lead, *self.scale.shape[1:]))  # fmt: skip

    def astype(self, dtype) -> jax.Array:
        """The dequantised weight in `dtype`."""
        return self.values.astype(dtype) * self.scale.astype(dtype)

    def take(self, ids) -> jax.Array:
        """Rows `ids` of a [V, D] table, dequantised (f32)."""
        rows = jnp.take(self.values, ids, axis=0).astype(jnp.float32)
        return rows * jnp.take(self.scale, ids, axis=0).astype(jnp.float32)


def take(table, ids):
    """jnp.take(table, ids, axis=0) for an array or an `Int8` table."""
    if isinstance(table, Int8):
        return table.take(ids)
    return jnp.take(table, ids, axis=0)


def quantize(w, contracted: tuple[int, ...]) -> Int8:
    """Symmetric int8 with one scale per output channel (max |w| over `contracted` / 127; an
    all-zero channel gets scale 1)."""
    w = jnp.asarray(w, jnp.float32)
    peak = jnp.max(jnp.abs(w), axis=contracted, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8(values, scale)


def matmul_error_bound(x, q: Int8, contracted: tuple[int, ...]):
    """The largest possible |x · W - x · dequantised W| per output of a 2-D x [M, D] with
    W [D, F] (contracted (0,)): (scale_j / 2) · sum_i |x_i| (each weight rounds by at most half
    its scale; the float error of the dots themselves comes on top)."""
    assert contracted == (0,) and q.ndim == 2
    return np.abs(np.asarray(x)).sum(-1, keepdims=True) * np.asarray(q.scale) / 2


def _by_name(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _by_name(value, name + ".")
        else:
            yield name, value


def _map_named(fn, tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out[key] = _map_named(fn, value, name + ".") if isinstance(value, dict) else fn(name, value)
    return out


def quantized_names(params: dict) -> list[str]:
    """The dotted names of the weights `quantize_params` turns into int8."""
    return [name for name, _ in _by_name(params) if name in CONTRACTED]


def quantize_params(params: dict) -> dict:
    """The parameter tree with every weight of CONTRACTED as an `Int8` (jit it with out
    shardings from `shardings`: `quantize_setup` does both)."""
    return _map_named(
        lambda name, w: quantize(w, CONTRACTED[name]) if name in CONTRACTED else w, params
    )


def _scale_sharding(s: NamedSharding, contracted) -> NamedSharding:
    """The values' sharding with the contracted (size-1) axes unsharded."""
    spec = list(s.spec) + [None] * 8
    return NamedSharding(s.mesh, PartitionSpec(*[None if i in contracted else spec[i]
                                                 for i in range(len(s.spec))]))  # fmt: skip


def quantize_setup(setup, params: Any, how: str | None):
    """(setup, params) for `how` ("int8" or None/"none": unchanged): the parameters quantised
    on the setup's mesh (each Int8 sharded as its weight, its scales likewise but unsharded
    along the contracted axes) and a setup whose param_shardings and abstract_params describe
    the new tree."""
    if how in (None, "none"):
        return setup, params
    if how not in QUANTIZE:
        from gptjax.config import ConfigError

        raise ConfigError(f"--quantize {how}: use one of none, {', '.join(QUANTIZE)}")

    def shard(name, s):
        if name not in CONTRACTED:
            return s
        return Int8(s, _scale_sharding(s, CONTRACTED[name]))

    shardings = _map_named(shard, setup.param_shardings)
    with setup.activate():
        quantized = jax.jit(quantize_params, out_shardings=shardings)(params)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), quantized, shardings
    )
    return dataclasses.replace(
        setup, param_shardings=shardings, abstract_params=abstract
    ), quantized


def nbytes(params: Any) -> int:
    """Bytes of a parameter tree's arrays (int8 values and their scales included)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def dequantize_params(params: Any) -> Any:
    """The float tree an int8 one stands for (every `Int8` as values · scale, f32)."""
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if isinstance(x, Int8) else x,
        params,
        is_leaf=lambda x: isinstance(x, Int8),
    )
