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


def attention(setting: str, dtype, platform: str) -> str:
    """The attention implementation ("xla" or "cudnn") for `model.attention=setting`.

    `auto` picks cuDNN flash attention on NVIDIA GPUs in bf16/f16 and XLA elsewhere; `cudnn`
    where it cannot run is a ConfigError.
    """
    half = jnp.dtype(dtype) in HALF
    nvidia = platform == "cuda"
    if setting == "cudnn" and not (nvidia and half):
        need = "an NVIDIA GPU" if not nvidia else "model.dtype=bfloat16"
        raise ConfigError(f"model.attention=cudnn needs {need}; use model.attention=auto or xla")
    if setting != "auto":
        return setting
    return "cudnn" if nvidia and half else "xla"


def resolve(cfg: ModelConfig, devices: Sequence[jax.Device]) -> ModelConfig:
    """`cfg` with every platform choice made for `devices` (`model.attention: auto` -> xla or
    cudnn); what the model graph of a step is built with."""
    impl = attention(cfg.attention, cfg.dtype, platform_of(devices))
    return cfg if impl == cfg.attention else cfg.model_copy(update={"attention": impl})
