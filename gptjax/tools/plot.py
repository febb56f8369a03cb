"""`gptjax plot RUN_DIR`: one PNG of a run's metrics.jsonl against the step.

Panels: train and eval loss (nats/token), learning rate, throughput (tokens/s) and MFU, and with
train.eval_tasks a fifth: each task's eval/TASK/acc and eval/TASK/acc_norm. Needs matplotlib (a
dependency of gptjax), imported only here and drawn with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptjax.errors import UserError


class PlotError(UserError):
    """A run directory that cannot be plotted, or matplotlib missing (one line)."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSON records of run_dir/metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a run directory that has trained?")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise PlotError(f"{path}:{number} is not a JSON line") from None
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record carrying `key`, in step order."""
    points = sorted((r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r)
    return [s for s, _ in points], [v for _, v in points]


PANELS = (
    ("loss (nats/token)", ("loss", "eval_loss")),
    ("learning rate", ("lr",)),
    ("tokens/s", ("tokens_per_s",)),
    ("MFU", ("mfu",)),
)


def task_keys(records: list[dict[str, Any]]) -> list[str]:
    """The task accuracies logged (train.eval_tasks): eval/TASK/acc and eval/TASK/acc_norm."""
    found = {k for r in records for k in r if k.startswith("eval/")}
    return sorted(k for k in found if k.rsplit("/", 1)[-1] in ("acc", "acc_norm"))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default run_dir/metrics.png) and return its path."""
    records = read_metrics(run_dir)
    if not any("loss" in r for r in records):
        raise PlotError(f"{Path(run_dir) / 'metrics.jsonl'} has no train records yet")
    plt = pyplot("gptjax plot needs matplotlib (a gptjax dependency): pip install matplotlib")
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    panels = list(PANELS)
    if tasks := task_keys(records):
        panels.append(("task accuracy", tuple(tasks)))
    columns = 2 if len(panels) == 4 else 3
    figure, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 7), sharex=True)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                style = "o-" if key.startswith("eval") else "-"
                ax.plot(steps, values, style, label=key, markersize=3)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    for ax in axes.flat[len(panels) - columns : len(panels)]:  # the lowest panel of each column
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)
    figure.suptitle(str(Path(run_dir).resolve().name))
    return save_figure(figure, out, plt)


def pyplot(missing: str):
    """matplotlib.pyplot on the Agg backend (no display needed); PlotError `missing` (the line
    that says how to install it) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(missing) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, out: Path, plt) -> Path:
    """Write `figure` as a PNG (one line when the file cannot be written) and close it."""
    figure.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror}") from None
    finally:
        plt.close(figure)
    return out
