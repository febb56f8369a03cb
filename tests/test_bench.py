"""`gptjax bench`: the MFU arithmetic against a hand count, and the JSON line it prints."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, run_cli

from gptjax import cli, config
from gptjax.core import flops
from gptjax.tools import bench

BENCH_FIELDS = {
    "device_kind": str,
    "platform": str,
    "device_count": int,
    "mesh": dict,
    "batch_size": int,
    "seq_len": int,
    "tokens_per_step": int,
    "dtype": str,
    "remat": str,
    "attention": str,
    "loss_chunk": int,
    "data": str,
    "params": int,
    "steps": int,
    "warmup": int,
    "compile_s": float,
    "time_to_first_step_s": float,
    "step_time_median_s": float,
    "step_time_min_s": float,
    "step_time_max_s": float,
    "process_cpu_s_per_step": float,
    "tokens_per_s": float,
    "tokens_per_s_per_device": float,
    "flops_per_token": float,
    "flops_formula": str,
    "model_flops_per_s": float,
    "peak_flops": float,
    "peak_flops_per_device": float,
    "peak_flops_source": str,
    "mfu": float,
    "peak_memory_bytes_per_device": (int, type(None)),
    "peak_memory_source": str,
    "host_peak_rss_bytes": int,
    "xla_memory_estimate_bytes_per_device": int,
    "loss": float,
}


def gpt2_small(vocab_size=50257):
    return config.ModelConfig(
        vocab_size=vocab_size, seq_len=1024, n_layer=12, n_head=12, d_model=768
    )


def test_gpt2_small_flops_per_token_by_hand():
    """PaLM appendix B for GPT-2 124M, counted from the architecture (not param_counts)."""
    V, T, L, D, H, Q = 50257, 1024, 12, 768, 12, 64
    layer = (
        (2 * D)  # ln_1 scale and bias
        + (D * 3 * D + 3 * D)  # qkv projection and bias
        + (D * D + D)  # attention output projection and bias
        + (2 * D)  # ln_2
        + (D * 4 * D + 4 * D)  # MLP up
        + (4 * D * D + D)  # MLP down
    )
    total = V * D + T * D + L * layer + 2 * D  # tied token table, positions, blocks, ln_f
    assert total == 124_439_808  # GPT-2 small as released
    n = total - T * D  # PaLM's N leaves out the position embeddings
    assert n == 124_439_808 - 786_432
    expected = 6 * n + 12 * L * H * Q * T
    assert expected == 855_166_464
    assert flops.flops_per_token(gpt2_small()) == expected


def test_mfu_arithmetic():
    """MFU = tokens/s × FLOPs/token / peak: 400k tokens/s on one H100 is 34.6% MFU."""
    per_token = flops.flops_per_token(gpt2_small())
    assert math.isclose(400_000 * per_token / 989e12, 0.345871, rel_tol=1e-5)
    assert bench.FLOPS_FORMULA.startswith("6N + 12LHQT (PaLM appendix B")


def test_bench_prints_every_field(cache_dir):
    debug_yaml = str(ROOT / "configs" / "debug.yaml")
    result = run_cli(
        "bench", debug_yaml, f"data.cache_dir={cache_dir}", "--steps", "3", "--warmup", "1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for key, kind in BENCH_FIELDS.items():
        assert isinstance(report[key], kind), (key, report[key])
    assert report["platform"] == "cpu" and report["device_count"] == 8  # conftest's fake devices
    assert report["tokens_per_step"] == 8 * 64
    assert report["tokens_per_s"] == pytest.approx(8 * 64 / report["step_time_median_s"])
    assert report["tokens_per_s_per_device"] == pytest.approx(report["tokens_per_s"] / 8)
    cfg = config.load(ROOT / "configs" / "debug.yaml")
    assert report["flops_per_token"] == flops.flops_per_token(cfg.model)
    assert report["params"] == flops.param_counts(cfg.model)["params"]
    assert report["mfu"] == pytest.approx(
        report["tokens_per_s"] * report["flops_per_token"] / report["peak_flops"]
    )
    assert report["peak_flops_source"].startswith(f"measured f32 matmul, cached in {cache_dir}")
    assert report["peak_memory_bytes_per_device"] is None  # CPU: says so, gives RSS instead
    assert "host_peak_rss_bytes" in report["peak_memory_source"]
    assert report["time_to_first_step_s"] >= report["compile_s"] > 0
    assert report["step_time_min_s"] <= report["step_time_median_s"] <= report["step_time_max_s"]
    assert 0 < report["loss"] < 2 * math.log(512)  # uniform random tokens: loss near ln V


def test_bench_batch_sizes_one_line_each_with_chunked_loss(capsys):
    argv = ["bench", str(ROOT / "configs" / "debug.yaml"), "model.loss_chunk=16"]
    code = cli.main([*argv, "--batch-sizes", "8,16", "--steps", "1", "--warmup", "0"])
    assert code == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["batch_size"] for r in reports] == [8, 16]
    assert [r["tokens_per_step"] for r in reports] == [8 * 64, 16 * 64]
    assert all(r["loss_chunk"] == 16 and "error" not in r for r in reports)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.attention=cudnn"], "model.attention=cudnn needs an NVIDIA GPU"),
        (["--batch-sizes", "8,x"], "--batch-sizes '8,x': use comma-separated integers"),
        (["--steps", "0"], "bench needs --steps >= 1"),
        (["model.n_layrs=2"], "unknown config key 'model.n_layrs'"),
    ],
)
def test_bench_user_errors_are_one_line(args, message, capsys):
    code = cli.main(["bench", str(ROOT / "configs" / "debug.yaml"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0, err


def test_gpu_script_skips_cleanly_without_a_gpu():
    script = ROOT / "launch" / "bench_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "JAX sees no GPU (backend: cpu); nothing to measure" in result.stderr
    assert result.stdout == ""


def test_out_of_memory_is_recognised():
    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    assert bench.is_out_of_memory(error)
    assert not bench.is_out_of_memory(ValueError("shapes do not match"))


def test_bench_on_real_batches(tmp_path, cache_dir, capsys):
    """--data real: batches from the config's corpus (the cached stdlib tokens)."""
    argv = ["bench", str(ROOT / "configs" / "debug.yaml"), f"run_dir={tmp_path}"]
    argv += [f"data.cache_dir={cache_dir}", "--data", "real", "--steps", "1", "--warmup", "0"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "real"
    assert 0 < report["loss"] < 2 * math.log(512)


def test_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    """The CPU peak behind MFU is measured once per machine (CPU model, cores, CPU devices) and
    read back afterwards, so a busy moment cannot move it; a damaged file is measured again."""
    measured = iter([300e9, 100e9, 250e9, 200e9])  # what a loaded machine might measure
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda: next(measured))
    flops.cpu_peak.cache_clear()
    devices = jax.devices()
    assert flops.peak_flops(devices, tmp_path)[0] == 300e9
    flops.cpu_peak.cache_clear()  # a new process
    peak, source = flops.peak_flops(devices, tmp_path)
    assert peak == 300e9  # the cached number, not the busy 100e9
    (path,) = (tmp_path / "cpu_peak").iterdir()
    assert source == f"measured f32 matmul, cached in {path}"
    record = json.loads(path.read_text())
    assert record["flops"] == 300e9 and record["machine"] == flops.cpu_machine()
    assert record["machine"]["devices"] == 8  # conftest's fake devices are part of the key

    other = {**flops.cpu_machine(), "devices": 4}  # another device split of the cores
    monkeypatch.setattr(flops, "cpu_machine", lambda: other)
    flops.cpu_peak.cache_clear()
    assert flops.peak_flops(devices, tmp_path)[0] == 100e9
    assert len(list((tmp_path / "cpu_peak").iterdir())) == 2

    (split4,) = (p for p in (tmp_path / "cpu_peak").iterdir() if p.name.endswith("-4d.json"))
    negative = json.dumps({"machine": other, "flops": -1})
    for damaged, again in (("{not json", 250e9), (negative, 200e9)):
        split4.write_text(damaged)
        flops.cpu_peak.cache_clear()
        assert flops.peak_flops(devices, tmp_path)[0] == again
    flops.cpu_peak.cache_clear()
