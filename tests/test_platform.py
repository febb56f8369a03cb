"""Platform choices (gptjax/core/platform.py) come from the devices a step is built for.

No GPU and no CUDA plugin are needed here: GPU devices are stand-ins with the attributes the
choice reads (`platform`, `device_kind`, `client.platform_version`). tests/test_gpu_plan.py
builds the same config for real deviceless GPU descriptions where the plugin is installed.
"""

from types import SimpleNamespace

import jax
import pytest
from conftest import tiny_config

from gptjax.config import ConfigError
from gptjax.core import platform, steps


def device(platform_name: str, kind: str, version: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        platform=platform_name,
        device_kind=kind,
        client=SimpleNamespace(platform_version=version),
    )


H200 = device("cuda", "NVIDIA H200")  # as jax.experimental.topologies describes one
H100_LOCAL = device("gpu", "NVIDIA H100 80GB HBM3", "cuda 12080")  # a GPU this process drives
MI300 = device("gpu", "AMD Instinct MI300X", "rocm 60300")


def test_platform_of_devices():
    assert platform.platform_of(jax.devices("cpu")) == "cpu"
    assert platform.platform_of([H200]) == "cuda"
    assert platform.platform_of([H100_LOCAL]) == "cuda"
    assert platform.platform_of([MI300]) == "rocm"
    assert platform.platform_of([device("tpu", "TPU v5 lite")]) == "tpu"


@pytest.mark.parametrize(
    "setting, dtype, where, expected",
    [
        ("auto", "bfloat16", "cuda", "cudnn"),
        ("auto", "float32", "cuda", "xla"),
        ("auto", "bfloat16", "cpu", "xla"),
        ("auto", "bfloat16", "rocm", "xla"),
        ("auto", "bfloat16", "tpu", "xla"),
        ("xla", "bfloat16", "cuda", "xla"),
        ("cudnn", "bfloat16", "cuda", "cudnn"),
    ],
)
def test_attention_choice(setting, dtype, where, expected):
    assert platform.attention(setting, dtype, where) == expected
    assert platform.attention(setting, dtype, where, head_dim=64) == expected


def test_cudnn_takes_head_sizes_up_to_128_in_multiples_of_8():
    """jax.nn.dot_product_attention(implementation="cudnn") refuses other head sizes while
    tracing; `auto` then picks xla and an explicit `cudnn` is a one-line error."""
    assert platform.attention("auto", "bfloat16", "cuda", head_dim=128) == "cudnn"
    assert platform.attention("auto", "bfloat16", "cuda", head_dim=256) == "xla"
    assert platform.attention("auto", "bfloat16", "cuda", head_dim=36) == "xla"
    with pytest.raises(ConfigError, match="a multiple of 8 and at most 128, not 256; use "):
        platform.attention("cudnn", "bfloat16", "cuda", head_dim=256)


@pytest.mark.parametrize(
    "dtype, where, need",
    [("bfloat16", "cpu", "an NVIDIA GPU"), ("float32", "cuda", "model.dtype=bfloat16")],
)
def test_cudnn_where_it_cannot_run_is_one_line(dtype, where, need):
    with pytest.raises(ConfigError, match=f"^model.attention=cudnn needs {need}; use "):
        platform.attention("cudnn", dtype, where)


def test_the_same_config_built_for_cpu_and_for_gpu_devices(tmp_path, cache_dir):
    """The step built for CPU devices takes xla attention whatever the default backend; the
    same model config resolved for NVIDIA devices takes cudnn; the user's config is kept."""
    cfg = tiny_config(tmp_path, cache_dir, "model.dtype=bfloat16", "mesh.data=2")
    setup = steps.build(cfg, jax.devices("cpu")[:2])
    assert setup.model_cfg.attention == "xla"
    assert setup.cfg.model.attention == "auto"  # what run_dir/config.yaml keeps
    gpu = platform.resolve(cfg.model, [H200] * 2)
    assert gpu.attention == "cudnn"
    assert gpu.model_copy(update={"attention": "auto"}) == cfg.model  # nothing else changes
    f32 = cfg.model.model_copy(update={"dtype": "float32"})
    assert platform.resolve(f32, [H200]).attention == "xla"
