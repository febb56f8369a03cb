"""What the platform decides, taken from the devices a step is built for.

A step can be compiled for devices this process does not drive: `gptjax plan --target h200:8`
builds it for deviceless GPU descriptions while `jax.default_backend()` stays "cpu". So every
platform choice reads the devices of the mesh, never the process's default backend; `steps.build`
resolves them once into the model config the graph is built with.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from gptjax.config import ConfigError, ModelConfig

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # jax.nn.dot_product_attention(implementation="cudnn") refuses more


def platform_of(devices: Sequence[jax.Device]) -> str:
    """ "cpu", "cuda" (NVIDIA), "rocm" (AMD) or "tpu" for the devices a step is built for.

    A CUDA device reports platform "gpu" when this process drives it and "cuda" when it is a
    deviceless description (jax.experimental.topologies); an AMD one says "rocm" in its kind or
    its client's platform version.
    """
    device = devices[0]
    name = device.platform.lower()
    if name not in ("gpu", "cuda", "rocm"):
        return name
    client = getattr(device, "client", None)
    version = str(getattr(client, "platform_version", "") or "")
    return "rocm" if "rocm" in f"{name} {version} {device.device_kind}".lower() else "cuda"


def attention(setting: str, dtype, platform: str, head_dim: int | None = None) -> str:
    """The attention implementation ("xla" or "cudnn") for `model.attention=setting`.

    `auto` picks cuDNN flash attention on NVIDIA GPUs in bf16/f16 for a head size it takes (a
    multiple of 8, at most 128; None: not checked) and XLA elsewhere; `cudnn` where it cannot
    run is a ConfigError.
    """
    half = jnp.dtype(dtype) in HALF
    nvidia = platform == "cuda"
    head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
    if setting == "cudnn" and not (nvidia and half and head_ok):
        if not nvidia:
            need = "an NVIDIA GPU"
        elif not half:
            need = "model.dtype=bfloat16"
        else:
            need = "a head size (d_model / n_head) that is a multiple of 8 and at most "
            need += f"{CUDNN_MAX_HEAD_DIM}, not {head_dim}"
        raise ConfigError(f"model.attention=cudnn needs {need}; use model.attention=auto or xla")
    if setting != "auto":
        return setting
    return "cudnn" if nvidia and half and head_ok else "xla"


def resolve(cfg: ModelConfig, devices: Sequence[jax.Device]) -> ModelConfig:
    """`cfg` with every platform choice made for `devices` (`model.attention: auto` -> xla or
    cudnn); what the model graph of a step is built with."""
    impl = attention(cfg.attention, cfg.dtype, platform_of(devices), cfg.head_dim)
    return cfg if impl == cfg.attention else cfg.model_copy(update={"attention": impl})
