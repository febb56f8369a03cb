"""results.csv and the sweep's plots (PNG, matplotlib imported only here, Agg backend).

isoflop.png    loss against N per compute budget: the runs, each budget's parabola and its
               minimum (a dashed parabola: unbracketed, left out of the fit)
frontier.png   loss against compute for every run, and the frontier (the lowest loss at or
               below each compute); a grid sweep's points labelled by their grid values
optimal.png    N_opt and D_opt against compute: the bracketed minima, the fitted power laws
               and Chinchilla's compute-optimal line for reference
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.experiments import fit as fits
from gptjax.experiments.runs import RESULT_COLUMNS
from gptjax.experiments.spec import SweepError
from gptjax.tools.plot import pyplot, save_figure


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows under RESULT_COLUMNS, then any train.eval_tasks columns (eval/TASK/METRIC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    tasks = sorted({k for row in rows for k in row if k.startswith("eval/")})
    columns = [*RESULT_COLUMNS, *tasks]
    with open(scratch, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    scratch.replace(path)
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"results file not found: {path}")
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (csv.Error, UnicodeDecodeError) as error:
        raise SweepError(f"{path} is not a readable CSV: {error}") from None
    if not rows:
        raise SweepError(f"{path} has no rows")
    return rows


def chinchilla_optimal(compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N_opt and D_opt of Chinchilla's fit at compute C (with C = 6ND, as in the paper)."""
    c = fits.CHINCHILLA
    alpha, beta = c["alpha"], c["beta"]
    scale = (alpha * c["A"] / (beta * c["B"])) ** (1 / (alpha + beta))
    n_opt = scale * (compute / 6) ** (beta / (alpha + beta))
    return n_opt, compute / (6 * n_opt)


def plot_isoflop(p: fits.Points, result: dict[str, Any], path: Path, metric: str, plt) -> Path:
    figure, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(result["budgets"]), 1)))
    for color, budget in zip(colors, result["budgets"], strict=True):
        members = p.budget == budget["budget"]
        ax.scatter(p.N[members], p.loss[members], color=color, s=18)
        if "coefficients" in budget:
            c0, c1, c2 = budget["coefficients"]
            x = np.linspace(np.log(p.N[members]).min(), np.log(p.N[members]).max(), 100)
            style = "-" if budget["bracketed"] else "--"
            label = f"C = {budget['budget']:.2g}" + (
                "" if budget["bracketed"] else " (unbracketed)"
            )
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x**2, style, color=color, label=label)
        if budget["bracketed"]:
            ax.plot(budget["N_opt"], budget["loss_opt"], "*", color=color, markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(metric)
    ax.set_title("IsoFLOP curves (star: fitted minimum)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(figure, path, plt)


def grid_labels(rows: list[dict[str, Any]]) -> list[str] | None:
    """For a grid sweep's rows (no compute budgets), each run's grid values as a short label
    ("lr=0.003 d_model=64": the last part of each dotted key); None for an IsoFLOP sweep, whose
    points the colour (N) and budget already say."""
    if not rows or any(
        str(r.get("budget") or "").strip().lower() not in ("", "nan", "none") for r in rows
    ):
        return None

    def short(label: str) -> str:
        parts = (part.partition("=") for part in str(label or "").split())
        return " ".join(f"{key.rpartition('.')[2]}{eq}{value}" for key, eq, value in parts)

    return [short(r.get("label")) for r in rows]


def plot_frontier(
    p: fits.Points, path: Path, metric: str, plt, labels: list[str] | None = None
) -> Path:
    """Every run's loss against its compute, the frontier, and with `labels` (a grid sweep)
    each point labelled by its grid values."""
    figure, ax = plt.subplots(figsize=(7, 5))
    points = ax.scatter(p.C, p.loss, c=np.log10(p.N), cmap="viridis", s=20)
    figure.colorbar(points, ax=ax, label="log10 N")
    for x, y, text in zip(p.C, p.loss, labels or [], strict=False):
        ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    if labels:
        ax.margins(x=0.35)  # room for the rightmost labels
    order = np.argsort(p.C)
    frontier = np.minimum.accumulate(p.loss[order])
    ax.step(p.C[order], frontier, where="post", color="black", label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C (gptjax's count)")
    ax.set_ylabel(metric)
    ax.set_title("loss against compute")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(figure, path, plt)


def plot_optimal(result: dict[str, Any], path: Path, plt) -> Path:
    minima = [m for m in result["budgets"] if m["bracketed"]]
    compute = np.array([m["budget"] for m in minima])
    span = np.logspace(np.log10(compute.min()) - 0.3, np.log10(compute.max()) + 0.3, 50)
    chin_n, chin_d = chinchilla_optimal(span)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, coefficient, exponent, reference in (
        (axes[0], "N_opt", "N_opt_coefficient", "a", chin_n),
        (axes[1], "D_opt", "D_opt_coefficient", "b", chin_d),
    ):
        ax.plot(compute, [m[key] for m in minima], "o", label="IsoFLOP minima")
        if exponent in result:
            value = result[exponent]["value"]
            ax.plot(span, result[coefficient] * span**value, "-", label=f"fit: C^{value:.2f}")
        ax.plot(span, reference, ":", color="gray", label="Chinchilla (reference)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(figure, path, plt)


def plots(rows: list[dict[str, Any]], result: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs the results allow (IsoFLOP plots only with budgets of 3+ sizes)."""
    p = fits.points(rows, result["metric"], result["params"])
    if len(p) == 0:
        return []
    plt = pyplot("plots need matplotlib (a gptjax dependency): pip install matplotlib")
    out.mkdir(parents=True, exist_ok=True)
    label = fits.fitted_name(result["metric"])
    labels = grid_labels(fits.used_rows(rows, result["metric"]))
    written = [plot_frontier(p, out / "frontier.png", label, plt, labels)]
    iso = result["isoflop"]
    if any("coefficients" in b for b in iso["budgets"]):
        written.append(plot_isoflop(p, iso, out / "isoflop.png", label, plt))
    if any(b["bracketed"] for b in iso["budgets"]):
        written.append(plot_optimal(iso, out / "optimal.png", plt))
    return written


def _show(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    text = f"{value['value']:.4g}"
    if "low" in value:
        text += f" [{value['low']:.4g}, {value['high']:.4g}]"
    return text


def format_fits(result: dict[str, Any]) -> str:
    """The fits as text: what was fitted, the intervals (95% bootstrap), what was skipped."""
    lines = [
        f"fits on {result['runs']} finished runs, loss = {fits.fitted_name(result['metric'])}, "
        f"N = {result['params']}"
    ]
    iso = result["isoflop"]
    for budget in iso["budgets"]:
        if budget["bracketed"]:
            lines.append(
                f"  IsoFLOP C={budget['budget']:.3g}: N_opt {budget['N_opt']:.4g}, "
                f"D_opt {budget['D_opt']:.4g}, loss {budget['loss_opt']:.4f} "
                f"({budget['runs']} runs)"
            )
        else:
            lines.append(
                f"  IsoFLOP C={budget['budget']:.3g}: unbracketed ({budget['reason']}; "
                f"{budget['runs']} runs)"
            )
    if "skipped" in iso:
        lines.append(f"  N_opt ∝ C^a: not fitted: {iso['skipped']}")
    else:
        lines.append(f"  N_opt ∝ C^a: a = {_show(iso['a'])};  D_opt ∝ C^b: b = {_show(iso['b'])}")
    law = result["parametric"]
    if "skipped" in law:
        lines.append(f"  L(N, D): not fitted: {law['skipped']}")
    else:
        names = ("E", "A", "B", "alpha", "beta")
        lines.append(
            "  L(N, D) = E + A/N^alpha + B/D^beta: "
            + ", ".join(f"{k} {_show(law[k])}" for k in names)
        )
        lines.append(
            f"    implies a = {_show(law['a'])}, b = {_show(law['b'])}; rms log residual "
            f"{law['rms_log_residual']:.4f}; {law['bootstrap']} bootstrap fits"
        )
        if law["at_bound"]:
            lines.append(f"    at a bound (not a real optimum): {', '.join(law['at_bound'])}")
    held = result["holdout"]
    if "skipped" in held:
        lines.append(f"  hold-out: skipped: {held['skipped']}")
    else:
        budgets = ", ".join(f"{b:.3g}" for b in held["held_out_budgets"])
        lines.append(
            f"  hold-out (C = {budgets}, {len(held['runs'])} runs): mean |error| "
            f"{100 * held['mean_abs_relative_error']:.2f}%, "
            f"max {100 * held['max_abs_relative_error']:.2f}%"
        )
    return "\n".join(lines)


def _number(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    if value in (None, "") or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(float(value), spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """results.csv as an aligned text table."""
    lines = [
        f"{'run':<11}{'params':>11}{'tokens':>11}{'FLOPs':>10}{'loss':>8}{'bpb':>8}  "
        f"{'status':<12}label"
    ]
    for r in rows:
        lines.append(
            f"{r['run']:<11}{_number(r, 'params', ',.0f'):>11}{_number(r, 'tokens', ',.0f'):>11}"
            f"{_number(r, 'flops', '.2e'):>10}{_number(r, 'eval_loss', '.4f'):>8}"
            f"{_number(r, 'eval_bpb', '.4f'):>8}  {r['status']:<12}{r.get('label', '')}"
        )
    return "\n".join(lines)
