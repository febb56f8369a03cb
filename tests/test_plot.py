"""`gptjax plot` writes a PNG that opens; `train.profile_steps` writes a profiler trace."""

import json
import struct
import sys

import pytest
from conftest import ROOT, run_cli, tiny_config

from gptjax.tools import plot
from gptjax.training import loop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the PNG header: magic, then the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_metrics(run_dir, steps=20):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {"step": step, "loss": 6 - step / 10, "lr": 1e-3, "grad_norm": 1.0}
            | ({"tokens_per_s": 1000.0 + step, "mfu": 0.3} if step % 5 == 0 else {})
        )
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": 6 - step / 9, "eval_bpb": 2.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_series_reads_each_key_in_step_order(tmp_path):
    write_metrics(tmp_path)
    records = plot.read_metrics(tmp_path)
    assert plot.series(records, "eval_loss") == ([10, 20], [6 - 10 / 9, 6 - 20 / 9])
    steps, values = plot.series(records, "mfu")
    assert steps == [5, 10, 15, 20] and values == [0.3] * 4


def test_plot_cli_writes_png(tmp_path):
    write_metrics(tmp_path / "run")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "lo')  # a run killed mid-line
    out = tmp_path / "figures" / "run.png"
    result = run_cli("plot", str(tmp_path / "run"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert png_size(out) == (1100, 700)
    assert out.stat().st_size > 20_000  # four panels with lines, not an empty canvas


def test_plot_errors_are_one_line(tmp_path):
    result = run_cli("plot", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "metrics.jsonl not found" in result.stderr


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plot.PlotError, match=r"needs matplotlib .*: pip install matplotlib"):
        plot.plot_run(tmp_path)


@pytest.mark.slow
def test_trained_run_plots_and_profiles(tmp_path, cache_dir):
    """A real (tiny) run: profile_steps=[3, 4] leaves a trace; its metrics plot to a PNG."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir,
        cache_dir,
        "train.steps=6",
        "train.log_every=1",
        "train.eval_every=3",
        "train.profile_steps=[3,4]",
    )
    loop.train(cfg, progress=False)
    traces = list((run_dir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    records = plot.read_metrics(run_dir)
    assert plot.series(records, "eval_loss")[0] == [3, 6]
    assert plot.series(records, "tokens_per_s")[0] == [1, 2, 3, 4, 5, 6]
    out = plot.plot_run(run_dir)
    assert out == run_dir / "metrics.png"
    assert png_size(out) == (1100, 700)


def test_profile_steps_validation(tmp_path, cache_dir):
    from gptjax.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.profile_steps=\[5, 2\]"):
        tiny_config(tmp_path, cache_dir, "train.profile_steps=[5,2]")
    assert (ROOT / "configs" / "debug.yaml").is_file()
