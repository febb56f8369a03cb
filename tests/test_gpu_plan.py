"""`gptjax plan --target`: the real train, prefill and decode steps compiled by XLA's GPU compiler
for mock H200s. Needs JAX's CUDA plugin (the gpu-plan extra, ~5 GB), so these skip, saying so,
where it is absent; launch/ci_gpu_plan.sh installs it and runs them."""

import json

import pytest
from conftest import tiny_config

from gptjax import cli
from gptjax.core import steps
from gptjax.tools import gpu_target, plan

try:
    gpu_target.require_plugin()
    MISSING = None
except gpu_target.TargetError as error:
    MISSING = str(error)

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no CUDA plugin: {MISSING}")

# 2 heads of 32: a head size cuDNN's flash attention takes; 2 layers, width 64
TINY = ("model.n_head=2", "mesh.data=8", "train.batch_size=16")


def compiled_plan(tmp_path, cache_dir, *overrides, target="h200:8", **options):
    cfg = tiny_config(tmp_path, cache_dir, *TINY, *overrides)
    target = gpu_target.parse(target)
    return plan.plan(cfg, gpu_target.devices(target), target=target, **options)


def test_bf16_step_for_mock_h200s_uses_cudnn_attention(tmp_path, cache_dir):
    report = compiled_plan(tmp_path, cache_dir, "model.dtype=bfloat16")
    target = report["target"]
    assert target["attention"] == "cudnn" and report["compiler"] == "XLA:GPU"
    train = target["train_step"]
    assert train["cudnn_attention"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    # XLA's arguments are the analytic state plus the batch shard: nothing more, nothing less
    size = report["bytes_per_device"]
    # 2 rows of 64 int32 per device of inputs, targets and loss_mask (jit drops the unused
    # segment_ids and positions of a concat-packed batch)
    batch = 4 * 2 * 64 * 3
    assert train["argument"] == size["params"] + size["opt_state"] + 4 + batch  # + the step
    assert train["fits"] and target["fits"] and 0 < train["peak"] < target["device_memory"]


def test_f32_step_for_mock_h200s_has_no_cudnn_attention(tmp_path, cache_dir):
    report = compiled_plan(tmp_path, cache_dir, "model.dtype=float32")
    assert report["target"]["attention"] == "xla"
    assert report["target"]["train_step"]["cudnn_attention"] == []


def test_the_same_config_built_for_cpu_and_mock_gpu_devices(tmp_path, cache_dir):
    import jax

    cfg = tiny_config(tmp_path, cache_dir, *TINY, "model.dtype=bfloat16")
    gpus = gpu_target.devices(gpu_target.parse("h200:8"))
    assert steps.build(cfg, jax.devices("cpu")[:8]).model_cfg.attention == "xla"
    assert steps.build(cfg, gpus).model_cfg.attention == "cudnn"


def test_a_step_that_cannot_fit_is_reported_with_its_numbers(tmp_path, cache_dir, capsys):
    """A GPU of 64 MiB (a target file): the step needs more, and plan says how much."""
    facts = {**gpu_target.TARGETS["h200"], "memory": 64 * 2**20, "name": "NVIDIA H200 64MiB"}
    target_file = tmp_path / "small.txtpb"
    target_file.write_text(gpu_target.target_config(facts))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        tiny_config(tmp_path, cache_dir, *TINY, "model.d_model=512", "model.n_head=8").to_yaml()
    )
    args = ["plan", str(config_file), "model.dtype=bfloat16", "--target", f"{target_file}:8"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    train = report["target"]["train_step"]
    assert report["target"]["device_memory"] == 64 * 2**20
    assert train["peak"] > 64 * 2**20 and not train["fits"] and not report["target"]["fits"]
    assert train["peak"] == report["xla"]["total"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"train step         DOES NOT FIT: {train['peak'] / 2**30:,.2f} GiB of 0.06 GiB" in text


def test_generate_compiles_prefill_and_decode(tmp_path, cache_dir):
    report = compiled_plan(tmp_path, cache_dir, "model.dtype=bfloat16", generate=True, rows=3)
    generate = report["target"]["generate"]
    assert generate["rows"] == 8  # 3 prompts -> a power of two the 8 batch shards divide
    assert set(generate["programs"]) == {"prefill", "decode"}
    for program in generate["programs"].values():
        assert program["fits"] and program["peak"] > 0
    # the cached attention is two einsums (gptjax/core/model.py), never cuDNN's
    assert all(p["cudnn_attention"] == [] for p in generate["programs"].values())
