"""A Llama-style block (configs/debug_llama.yaml: RoPE, RMSNorm, SwiGLU, 8 query heads sharing 2
key/value heads, no biases) trains like one device on data, FSDP and tensor meshes, the helpers
and tolerances of tests/test_sharding.py. A tensor size that does not divide the 2 key/value
heads is refused in one line before compiling, and trains alike once `mesh.rules.kv_heads=null`
replicates the key/value heads on every tensor shard."""

from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import config
from gptjax.config import ConfigError
from gptjax.core import steps
from gptjax.data.batching import from_windows
from gptjax.tools import plan
from tests.test_sharding import EPS, LR, STEPS, batches

ROOT = Path(__file__).resolve().parents[1]
REPLICATE = "mesh.rules={kv_heads: null}"
# Each mesh costs a train-step compile (~8 s of CPU), so four (five shapes with one device):
# FSDP alone, data x tensor with the 2 key/value heads split over tensor 2, all three axes, and
# tensor > n_kv_head with the key/value heads replicated.
MESHES = {
    "fsdp8": (1, 8, 1),
    "data4_tensor2": (4, 1, 2),
    "2x2x2": (2, 2, 2),
    "fsdp2_tensor4_replicated_kv": (1, 2, 4, REPLICATE),
}


def llama_config(run_dir, cache_dir, data=1, fsdp=1, tensor=1, *more):
    return config.load(
        ROOT / "configs" / "debug_llama.yaml",
        [
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}",
            "model.n_head=8",
            "model.dtype=float32",
            f"optim.lr={LR}",
            f"optim.eps={EPS}",
            "optim.warmup_steps=0",
            f"train.steps={STEPS}",
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
            *more,
        ],
    )


def run(cfg, devices, params=None):
    """tests/test_sharding.py's `run` from given initial parameters (one initialisation for all
    meshes; that sharded initialisation draws the same numbers is test_sharding's test):
    (initial params, losses, final state)."""
    setup = steps.build(cfg, devices)
    state = steps.init_state(setup) if params is None else steps.fresh_state(setup, params)
    init = jax.device_get(state["params"])
    step = plan.compile_step(setup)
    losses = []
    for tokens in batches():
        state, stats = step(state, jax.device_put(from_windows(tokens, 0), setup.batch_shardings))
        losses.append(float(stats["loss"]))
    return init, np.array(losses), state


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("sharding_llama")
    out = {"1": run(llama_config(run_dir, cache_dir), jax.devices()[:1])}
    for name, shape in MESHES.items():
        cfg = llama_config(run_dir, cache_dir, *shape)
        out[name] = run(cfg, jax.devices()[:8], out["1"][0])
    return out


@pytest.mark.parametrize("name", MESHES)
def test_llama_block_trains_alike_on_every_mesh(llama_runs, name):
    _, ref_losses, ref_state = llama_runs["1"]
    _, losses, state = llama_runs[name]
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it learns
    assert "kv_w" in ref_state["params"]["blocks"]  # the grouped layout, not the fused one
    # the tolerances of tests/test_sharding.py (a mesh only reorders f32 sums)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state["params"]))
    for (path, a), b in zip(flat, jax.tree.leaves(ref_state["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_tensor_that_does_not_divide_kv_heads_is_one_line(tmp_path, cache_dir):
    cfg = llama_config(tmp_path, cache_dir, 1, 2, 4)
    with pytest.raises(ConfigError) as error:
        steps.build(cfg, jax.devices()[:8])
    message = str(error.value)
    assert "model.n_kv_head=2 is not divisible by mesh.tensor=4" in message, message
    assert "mesh.rules.kv_heads=null" in message and "\n" not in message
