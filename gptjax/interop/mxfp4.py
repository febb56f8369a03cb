"""MXFP4 (the OCP microscaling 4-bit float format) as gpt-oss checkpoints store expert weights:
dequantized on import, in NumPy.

A weight W [E, R, C] (R output rows, C = G · 32 inputs) is stored as `{name}_blocks` uint8
[E, R, G, 16] and `{name}_scales` uint8 [E, R, G]: each block holds 32 FP4 (E2M1) values, two
per byte (the low nibble first), and shares one power-of-two scale 2^(s − 127). The dequantized
tensor is the transpose [E, C, R], the layout of gpt-oss's bf16 `gate_up_proj` [E, D, 2F] and
`down_proj` [E, F, D] (transformers' `convert_moe_packed_tensors`). Every value is an FP4 value
times a power of two, exact in f32.
"""

from __future__ import annotations

import numpy as np

from gptjax.interop import InteropError

# E2M1: sign, two exponent bits, one mantissa bit (codes 0-7 positive, 8-15 their negatives)
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
BLOCK_BYTES = 16  # 32 values


def dequantize(blocks: np.ndarray, scales: np.ndarray, name: str = "") -> np.ndarray:
    """[E, R, G, 16] codes and [E, R, G] exponents -> f32 [E, G · 32, R]."""
    where = f"{name}_blocks" if name else "blocks"
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.ndim != 4 or blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise InteropError(
            f"{where} has shape {list(blocks.shape)} and its scales {list(scales.shape)}; MXFP4 "
            f"needs [E, R, G, {BLOCK_BYTES}] and [E, R, G]"
        )
    codes = blocks.astype(np.uint8)
    if not np.array_equal(codes, blocks):
        raise InteropError(f"{where} holds values that are not bytes")
    values = np.empty((*codes.shape[:-1], 2 * BLOCK_BYTES), np.float32)
    values[..., 0::2] = FP4_VALUES[codes & 0x0F]
    values[..., 1::2] = FP4_VALUES[codes >> 4]
    exponent = scales.astype(np.int32)[..., None] - 127
    values = np.ldexp(values, exponent)
    E, R, G, _ = codes.shape
    return np.ascontiguousarray(values.reshape(E, R, G * 2 * BLOCK_BYTES).swapaxes(1, 2))


def unpack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` with every `X_blocks` + `X_scales` pair replaced by the dequantized `X`; one
    line for a half pair."""
    out = dict(tensors)
    for key in sorted(k for k in tensors if k.endswith("_blocks")):
        stem = key.removesuffix("_blocks")
        if stem + "_scales" not in tensors:
            raise InteropError(f"MXFP4 tensor {key} has no {stem}_scales")
        out[stem] = dequantize(out.pop(key), out.pop(stem + "_scales"), stem)
    lone = sorted(k for k in out if k.endswith("_scales"))
    if lone:
        stem = lone[0].removesuffix("_scales")
        raise InteropError(f"MXFP4 tensor {lone[0]} has no {stem}_blocks")
    return out
