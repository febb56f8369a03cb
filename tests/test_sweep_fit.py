"""Scaling-law fits recover the laws that generated synthetic losses (gptjax/experiments/fit.py).

Oracle: losses drawn from Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta with known
parameters (and multiplicative noise); the compute-optimal exponent a = beta / (alpha + beta)
follows from them analytically.
"""

import csv
import json
import math

import numpy as np
import pytest
from conftest import run_cli

from gptjax.experiments import fit, report

TRUE = fit.CHINCHILLA  # E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28


def chinchilla_loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def optimal_n(C):
    """N_opt(C) of the true law under C = 6ND (minimise L(N, C/6N) analytically)."""
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    G = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    return G * (C / 6) ** (beta / (alpha + beta))


def grid_rows(noise=0.003, seed=1):
    """8 x 8 sizes and token counts, log-spaced over three decades each."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in np.logspace(7, 10, 8):
        for D in np.logspace(9, 12, 8):
            loss = chinchilla_loss(N, D) * math.exp(rng.normal(0, noise))
            rows.append({"params": N, "tokens": D, "flops": 6 * N * D, "eval_loss": loss})
    return rows


def isoflop_rows(budgets, noise=0.002, seed=2, spread=0.7, centre=1.3):
    """Per budget, 9 sizes log-spaced over ±`spread` decades around centre x the true N_opt."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        for N in optimal_n(C) * centre * np.logspace(-spread, spread, 9):
            D = C / (6 * N)
            loss = chinchilla_loss(N, D) * math.exp(rng.normal(0, noise))
            rows.append({"params": N, "tokens": D, "flops": C, "budget": C, "eval_loss": loss})
    return rows


def test_parametric_fit_recovers_the_law():
    p = fit.points(grid_rows(), "eval_loss")
    result = fit.parametric(p, bootstrap=20)
    assert abs(result["alpha"]["value"] - TRUE["alpha"]) < 0.01
    assert abs(result["beta"]["value"] - TRUE["beta"]) < 0.01
    assert abs(result["E"]["value"] - TRUE["E"]) < 0.01 * TRUE["E"]
    assert result["at_bound"] == []
    # the bootstrap interval brackets its own estimate and is not degenerate
    for key in ("E", "A", "B", "alpha", "beta"):
        assert result[key]["low"] < result[key]["value"] < result[key]["high"], key
    assert result["bootstrap"] == 20


def test_parametric_objective_gradient_matches_finite_differences():
    p = fit.points(grid_rows(), "eval_loss")
    args = (np.log(p.N), np.log(p.D), np.log(p.loss))
    theta = np.array([6.2, 5.9, 0.5, 0.35, 0.27])
    _, grad = fit.objective(theta, *args)
    step = 1e-6
    for i in range(5):
        up, down = theta.copy(), theta.copy()
        up[i] += step
        down[i] -= step
        numeric = (fit.objective(up, *args)[0] - fit.objective(down, *args)[0]) / (2 * step)
        assert numeric == pytest.approx(grad[i], rel=1e-4, abs=1e-9)


def test_parameter_at_its_bound_is_reported():
    # no irreducible loss (E = 0): ln E runs down to its lower bound
    rows = [
        dict(r, eval_loss=chinchilla_loss(r["params"], r["tokens"]) - TRUE["E"])
        for r in grid_rows(noise=0)
    ]
    result = fit.parametric(fit.points(rows, "eval_loss"), bootstrap=0)
    assert result["at_bound"] == ["ln E"]
    assert result["E"]["value"] == pytest.approx(math.exp(fit.BOUNDS[2][0]))


def test_isoflop_fit_recovers_the_exponent():
    budgets = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21]
    result = fit.isoflop(fit.points(isoflop_rows(budgets), "eval_loss"), bootstrap=50)
    true_a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert all(b["bracketed"] for b in result["budgets"])
    assert abs(result["a"]["value"] - true_a) < 0.02
    assert abs(result["b"]["value"] - (1 - true_a)) < 0.02  # C = 6ND: a + b = 1
    assert result["a"]["low"] <= result["a"]["value"] <= result["a"]["high"]


def test_unbracketed_budget_is_reported_not_extrapolated():
    budgets = [1e18, 1e19, 1e20]
    rows = isoflop_rows(budgets, noise=0)
    # the smallest budget only gets sizes far above its optimum: loss rises monotonically
    rows = [r for r in rows if r["budget"] != 1e18] + [
        r | {"budget": 1e18, "flops": 1e18}
        for r in isoflop_rows([1e18], noise=0, centre=30, spread=0.3)
    ]
    result = fit.isoflop(fit.points(rows, "eval_loss"), bootstrap=0)
    by_budget = {b["budget"]: b for b in result["budgets"]}
    assert not by_budget[1e18]["bracketed"]
    assert by_budget[1e18]["reason"] == "the lowest loss is at the smallest size tried"
    assert "N_opt" not in by_budget[1e18]
    assert by_budget[1e19]["bracketed"] and by_budget[1e20]["bracketed"]
    assert "a" in result  # fitted on the two bracketed budgets only


def test_holdout_predicts_the_largest_budget():
    budgets = [1e18, 3e18, 1e19, 3e19, 1e20]
    result = fit.holdout(fit.points(isoflop_rows(budgets, noise=0.002), "eval_loss"))
    assert result["held_out_budgets"] == [1e20]
    assert len(result["runs"]) == 9
    assert result["mean_abs_relative_error"] < 0.01


def test_compute_groups_without_a_budget_column():
    flops = np.array([1.0e12, 1.04e12, 0.97e12, 3e12, 3.1e12, 1e13])
    assert fit.compute_groups(flops).tolist() == [0, 0, 0, 1, 1, 2]


def test_fit_cli_on_a_csv(tmp_path):
    rows = isoflop_rows([1e18, 1e19, 1e20, 1e21])
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["params", "tokens", "flops", "eval_loss"])
        writer.writeheader()  # no budget column: runs are grouped by their FLOPs
        for r in rows:
            writer.writerow({k: r[k] for k in writer.fieldnames})
    plots = tmp_path / "plots"
    done = run_cli(
        "sweep", "fit", str(path), "--json", "--metric", "eval_loss", "--bootstrap", "10",
        "--plots", str(plots),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert {"value", "low", "high"} <= set(result["parametric"][key]), key
    for key in ("a", "b"):
        assert {"value", "low", "high"} <= set(result["isoflop"][key]), key
    assert abs(result["isoflop"]["a"]["value"] - 0.4516) < 0.02
    for name in ("frontier.png", "isoflop.png", "optimal.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_cli_bad_csv_is_one_line(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("params,tokens\n1,2\n")
    done = run_cli("sweep", "fit", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gptjax: error: results lack the column(s) eval_bpb, flops"
    ]


def test_results_csv_round_trip(tmp_path):
    rows = [
        {"run": "abc", "params": 10, "tokens": 20, "flops": 1e9, "eval_loss": 2.5,
         "eval_bpb": None, "status": "finished", "label": "x=1"}
    ]  # fmt: skip
    path = report.write_csv(rows, tmp_path / "results.csv")
    back = report.read_csv(path)
    assert back[0]["run"] == "abc" and float(back[0]["eval_loss"]) == 2.5
    assert back[0]["eval_bpb"] == "" and back[0]["budget"] == ""
    assert list(back[0])[:8] == [
        "run", "params", "non_embedding_params", "tokens", "flops", "eval_loss", "eval_bpb",
        "status",
    ]  # fmt: skip


def test_a_grid_sweeps_frontier_points_carry_their_grid_values(tmp_path, monkeypatch):
    """A grid sweep has no budgets: each frontier point is labelled by its grid values (the last
    part of each key); an IsoFLOP sweep's are not (colour and budget say what they are)."""
    rows = []
    for i, (lr, width) in enumerate([(1e-3, 64), (3e-3, 64), (1e-3, 128), (3e-3, 128)]):
        rows.append(
            {
                "params": 1e5 * (width // 64),
                "tokens": 1e6,
                "flops": 6e11 * (width // 64),
                "eval_loss": 3.0 - 0.1 * i,
                "status": "finished",
                "label": f"optim.lr={lr:g} model.d_model={width}",
                "budget": "",
            }
        )
    rows.append({**rows[0], "status": "failed", "label": "optim.lr=0.1 model.d_model=64"})
    drawn = []
    real_save = report.save_figure

    def capture(figure, path, plt):
        drawn.append((path.name, [t.get_text() for t in figure.axes[0].texts]))
        return real_save(figure, path, plt)

    monkeypatch.setattr(report, "save_figure", capture)
    result = fit.fit_all(rows, "eval_loss", bootstrap=0)
    report.plots(rows, result, tmp_path)
    frontier = dict(drawn)["frontier.png"]
    assert frontier == ["lr=0.001 d_model=64", "lr=0.003 d_model=64", "lr=0.001 d_model=128",
                        "lr=0.003 d_model=128"]  # fmt: skip
    assert report.grid_labels([{**rows[0], "budget": "1e12"}]) is None
