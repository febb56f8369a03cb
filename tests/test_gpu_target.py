"""`gptjax plan --target` without the CUDA plugin: target parsing, the one-line errors, the
cuDNN-call detector. (The compiles themselves are in tests/test_gpu_plan.py, which needs the
plugin and runs in launch/ci_gpu_plan.sh.)"""

import importlib.metadata
import re

import pytest
from conftest import ROOT

from gptjax import cli
from gptjax.tools import gpu_target


def test_built_in_targets_and_gpu_counts():
    h200 = gpu_target.parse("h200:64")
    assert (h200.kind, h200.count, h200.topology) == ("NVIDIA H200", 64, "1x8x8")
    assert h200.memory == 141_000_000_000
    assert 'device_description_str: "NVIDIA H200"' in h200.text
    assert "device_memory_size: 141000000000" in h200.text
    assert gpu_target.parse("H100").count == 8  # one host by default
    assert gpu_target.parse("h100", default_count=16).topology == "1x2x8"
    a100 = gpu_target.parse("a100:4")
    assert a100.topology == "1x1x4" and "cuda_compute_capability { major: 8 minor: 0 }" in a100.text


def test_a_target_file(tmp_path):
    text = gpu_target.target_config({**gpu_target.TARGETS["h100"], "memory": 12345, "name": "X"})
    path = tmp_path / "small.txtpb"
    path.write_text(text)
    target = gpu_target.parse(f"{path}:16")
    assert (target.kind, target.memory, target.count, target.text) == ("X", 12345, 16, text)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("h200:12", "--target h200:12: 12 GPUs; use up to 8 (one host) or a multiple of 8"),
        ("h300:8", "--target h300:8: not one of h100, h200, a100 and no file h300"),
        ("h200:0", "--target h200:0: 0 GPUs"),
    ],
)
def test_bad_targets_are_one_line(spec, message):
    with pytest.raises(gpu_target.TargetError, match="^" + re.escape(message)):
        gpu_target.parse(spec)


def _plugins(monkeypatch, version: str | None):
    """Pretend the CUDA plugin is absent (None) or installed at `version`."""
    real = importlib.metadata.version

    def fake(name):
        if name in gpu_target.PLUGINS:
            if version is None or name != gpu_target.PLUGINS[0]:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(gpu_target.importlib.metadata, "version", fake)


def test_missing_plugin_is_one_line_saying_what_to_install(monkeypatch, capsys):
    _plugins(monkeypatch, None)
    code = cli.main(["plan", str(ROOT / "configs" / "debug.yaml"), "--target", "h200:8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("gptjax: error: --target compiles with JAX's CUDA plugin, which is not")
    assert "pip install 'gptjax[gpu-plan]'" in err


def test_plugin_of_another_jax_version_is_one_line(monkeypatch):
    import jax

    _plugins(monkeypatch, "0.0.1")
    with pytest.raises(gpu_target.TargetError) as error:
        gpu_target.require_plugin()
    assert str(error.value) == (
        f"jax-cuda12-plugin 0.0.1 does not match jax {jax.__version__}: "
        f"pip install 'jax[cuda12]=={jax.__version__}'"
    )


def test_cudnn_attention_calls_are_read_from_the_program_text():
    hlo = (
        '%a = custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", x\n'
        '%b = custom-call(%g), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
        '%c = custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"\n'
        '%d = custom-call(%x), custom_call_target="__cublas$gemm"\n'
    )
    assert gpu_target.attention_calls(hlo) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    assert gpu_target.attention_calls('custom_call_target="__cublas$lt$matmul"') == []
