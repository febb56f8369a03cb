"""Scaling-law fits on finished runs: (N parameters, D tokens, C FLOPs, loss) per run.

- IsoFLOP (Chinchilla's approach 2): per compute budget, a parabola of the loss in ln N; its
  vertex is N_opt when the budget's lowest loss is not at its smallest or largest size and the
  parabola has its minimum inside that range (else the budget is reported as unbracketed and
  left out, never extrapolated). D_opt is read off the budget's own
  (N, D) pairs at N_opt. Then ln N_opt = a ln C + k and ln D_opt = b ln C + k' by least squares.
- Parametric (approach 3): L(N, D) = E + A/N^alpha + B/D^beta, fitted in log space as
  ln L = LSE(ln A - alpha ln N, ln B - beta ln D, ln E), minimising the SUM of Huber losses
  (delta = 1e-3) of the residuals with L-BFGS-B. Starting points: Chinchilla's grid (ln A, ln B in
  0..25, ln E in -1..1, alpha, beta in 0..2), the best of them by the objective refined (the grid
  is cheap to score all at once; L-BFGS from its best points finds the same optimum as from every
  point). Tolerances are tight: a summed Huber of small residuals is a small number, and the
  default stopping rule ends too early (Besiroglu et al. 2024).
- Intervals: percentile bootstrap (resampling runs, within each budget for IsoFLOP).
- Hold-out: the parametric fit without the largest-compute group(s), and its error on them.

The metric is a loss (eval_bpb, eval_loss) or a task's number logged by train.eval_tasks:
eval/TASK/ppl is fitted as it is, an accuracy (eval/TASK/acc, eval/TASK/acc_norm) as its error
rate 1 - acc, so that lower is better and a floor E is the error the law tends to.

Needs scipy (the `sweep` extra), imported when a fit runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptjax.experiments.spec import TASK_METRIC, SweepError, metric_problem

# Chinchilla's parametric fit (Hoffmann et al. 2022), for reference lines.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
HUBER_DELTA = 1e-3
# theta = (ln A, ln B, ln E, alpha, beta)
BOUNDS = ((-5.0, 30.0), (-5.0, 30.0), (-5.0, 3.0), (0.0, 3.0), (0.0, 3.0))
NAMES = ("A", "B", "E", "alpha", "beta")
START_GRID = np.array(
    list(
        itertools.product(
            np.arange(0.0, 26.0, 5.0),
            np.arange(0.0, 26.0, 5.0),
            np.arange(-1.0, 1.01, 0.5),
            np.arange(0.0, 2.01, 0.5),
            np.arange(0.0, 2.01, 0.5),
        )
    )
)


def check_metric(metric: str) -> str:
    """The metric, if it is one a fit takes (else a SweepError naming the choices)."""
    if problem := metric_problem(metric):
        raise SweepError(problem)
    return metric


def is_accuracy(metric: str) -> bool:
    return bool(TASK_METRIC.fullmatch(metric)) and not metric.endswith("/ppl")


def fitted_name(metric: str) -> str:
    """What the fit takes as its loss: the metric, or for an accuracy its error 1 - acc."""
    return f"1 - {metric}" if is_accuracy(metric) else metric


@dataclass
class Points:
    """Finished runs as arrays: N (parameters), D (tokens), C (FLOPs), loss, compute group."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray
    group: np.ndarray  # integer id of the compute budget each run belongs to (0 = smallest)
    budget: np.ndarray  # that budget in FLOPs (nominal, else the group's median FLOPs)

    def take(self, index: np.ndarray) -> Points:
        return Points(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.loss)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def compute_groups(flops: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """Runs whose FLOPs are within `tolerance` (relative) of their neighbour share a group."""
    order = np.argsort(flops)
    group = np.zeros(len(flops), int)
    current = 0
    for previous, index in itertools.pairwise(order):
        if flops[index] > flops[previous] * (1 + tolerance):
            current += 1
        group[index] = current
    return group


def _loss_of(metric: str):
    """row -> the metric as a loss (an accuracy as its error, 1 - acc)."""
    sign, offset = (-1.0, 1.0) if is_accuracy(metric) else (1.0, 0.0)
    return lambda row: offset + sign * _float(row.get(metric))


def used_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows `points` keeps, in its order: finished, with a finite positive loss."""
    value = _loss_of(metric)
    return [
        r
        for r in rows
        if r.get("status", "finished") in ("finished", "", None)
        and math.isfinite(value(r))
        and value(r) > 0
    ]


def points(rows: list[dict[str, Any]], metric: str, params: str = "params") -> Points:
    """The finished rows with a finite `metric` (an accuracy as its error, 1 - acc); groups by
    the `budget` column, else by FLOPs."""
    check_metric(metric)
    missing = {params, "tokens", "flops", metric} - set(rows[0]) if rows else set()
    if missing:
        raise SweepError(f"results lack the column(s) {', '.join(sorted(missing))}")
    kept = used_rows(rows, metric)
    value = _loss_of(metric)
    N = np.array([_float(r[params]) for r in kept])
    D = np.array([_float(r["tokens"]) for r in kept])
    C = np.array([_float(r["flops"]) for r in kept])
    loss = np.array([value(r) for r in kept])
    budgets = np.array([_float(r.get("budget")) for r in kept])
    if len(kept) and np.all(np.isfinite(budgets)):
        values = np.unique(budgets)
        group = np.searchsorted(values, budgets)
    else:
        group = compute_groups(C)
        budgets = np.array([np.median(C[group == g]) for g in group])
    return Points(N, D, C, loss, group, budgets)


# ---------------------------------------------------------------- parametric L(N, D)


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    size = np.abs(residual)
    return np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))


def _terms(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray):
    """The three log-terms [..., n] for theta [..., 5] and their log-sum-exp."""
    a, b, e, alpha, beta = (theta[..., i : i + 1] for i in range(5))
    t1, t2 = a - alpha * logN, b - beta * logD
    t3 = np.broadcast_to(e, t1.shape)
    top = np.maximum(np.maximum(t1, t2), t3)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(t3 - top)
    total = w1 + w2 + w3
    return top + np.log(total), (w1 / total, w2 / total, w3 / total)


def objective(theta, logN, logD, logL, delta=HUBER_DELTA):
    """Sum of Huber losses of log-loss residuals, and its gradient in theta."""
    predicted, (w1, w2, w3) = _terms(np.asarray(theta, float), logN, logD)
    residual = predicted - logL
    slope = np.clip(residual, -delta, delta)  # d huber / d residual
    grad = np.array(
        [
            (slope * w1).sum(),
            (slope * w2).sum(),
            (slope * w3).sum(),
            -(slope * w1 * logN).sum(),
            -(slope * w2 * logD).sum(),
        ]
    )
    return float(_huber(residual, delta).sum()), grad


def _minimize(starts: np.ndarray, logN, logD, logL) -> np.ndarray:
    try:
        from scipy.optimize import minimize
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise SweepError(
            "the fits need scipy and threadpoolctl: pip install 'gptjax[sweep]'"
        ) from None
    best, best_value = None, math.inf
    options = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20_000, "maxfun": 40_000}
    # L-BFGS-B's 5-dimensional linear algebra goes through BLAS: threads only add hand-offs
    # (measured 12x slower on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        for start in starts:
            result = minimize(
                objective,
                start,
                args=(logN, logD, logL),
                jac=True,
                method="L-BFGS-B",
                bounds=BOUNDS,
                options=options,
            )
            if result.fun < best_value:
                best, best_value = result.x, result.fun
    return best


def _best_starts(logN, logD, logL, count: int) -> np.ndarray:
    predicted, _ = _terms(START_GRID, logN, logD)
    scores = _huber(predicted - logL, HUBER_DELTA).sum(axis=1)
    return START_GRID[np.argsort(scores)[:count]]


def fit_law(p: Points, starts: int = 64, extra: np.ndarray | None = None) -> np.ndarray:
    """theta = (ln A, ln B, ln E, alpha, beta) of the best L-BFGS run from the best `starts`
    grid points (and `extra` starting points)."""
    logN, logD, logL = np.log(p.N), np.log(p.D), np.log(p.loss)
    candidates = _best_starts(logN, logD, logL, starts)
    if extra is not None:
        candidates = np.vstack([extra, candidates])
    return _minimize(candidates, logN, logD, logL)


def law(theta: np.ndarray) -> dict[str, float]:
    """theta as {E, A, B, alpha, beta} and the compute-optimal exponents it implies."""
    a_log, b_log, e_log, alpha, beta = (float(x) for x in theta)
    total = alpha + beta
    return {
        "E": math.exp(e_log),
        "A": math.exp(a_log),
        "B": math.exp(b_log),
        "alpha": alpha,
        "beta": beta,
        "a": beta / total if total else math.nan,
        "b": alpha / total if total else math.nan,
    }


def predict(fitted: dict[str, float], N, D) -> np.ndarray:
    N, D = np.asarray(N, float), np.asarray(D, float)
    return fitted["E"] + fitted["A"] / N ** fitted["alpha"] + fitted["B"] / D ** fitted["beta"]


def _interval(values: np.ndarray, point: float) -> dict[str, float]:
    out = {"value": point}
    finite = values[np.isfinite(values)]
    if len(finite) >= 2:
        low, high = np.percentile(finite, [2.5, 97.5])
        out |= {"low": float(low), "high": float(high), "std": float(np.std(finite, ddof=1))}
    return out


def _enough_for_law(p: Points) -> str | None:
    if len(p) < 5:
        return f"{len(p)} finished runs; the parametric fit needs at least 5"
    if len(np.unique(p.N)) < 2 or len(np.unique(p.D)) < 2:
        return "N or D takes a single value: the parametric fit needs both to vary"
    return None


def parametric(p: Points, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """The fitted law with bootstrap intervals, and which parameters sit at their bounds."""
    reason = _enough_for_law(p)
    if reason:
        return {"skipped": reason}
    theta = fit_law(p)
    at_bound = [
        name if name in ("alpha", "beta") else f"ln {name}"
        for name, value, (low, high) in zip(NAMES, theta, BOUNDS, strict=True)
        if min(value - low, high - value) < 1e-6 * max(1.0, abs(value))
    ]
    fitted = law(theta)
    samples = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        resample = p.take(rng.integers(0, len(p), len(p)))
        if _enough_for_law(resample):
            continue
        samples.append(law(fit_law(resample, starts=4, extra=theta[None])))
    out: dict[str, Any] = {}
    for key, value in fitted.items():
        out[key] = _interval(np.array([s[key] for s in samples]), value)
    residual = np.log(predict(fitted, p.N, p.D)) - np.log(p.loss)
    out["rms_log_residual"] = float(np.sqrt(np.mean(residual**2)))
    out["runs"] = len(p)
    out["bootstrap"] = len(samples)
    out["at_bound"] = at_bound
    return out


# ---------------------------------------------------------------- IsoFLOP


def budget_minimum(p: Points) -> dict[str, Any]:
    """One budget's parabola L = c0 + c1 x + c2 x^2 in x = ln N, and its minimum if bracketed."""
    x = np.log(p.N)
    out: dict[str, Any] = {"budget": float(p.budget[0]), "runs": len(p), "bracketed": False}
    if len(np.unique(x)) < 3:
        out["reason"] = "fewer than 3 sizes"
        return out
    c2, c1, c0 = np.polyfit(x, p.loss, 2)
    out["coefficients"] = [float(c0), float(c1), float(c2)]
    best = x[np.argmin(p.loss)]
    if best in (x.min(), x.max()):
        end = "smallest" if best == x.min() else "largest"
        out["reason"] = f"the lowest loss is at the {end} size tried"
        return out
    if c2 <= 0:
        out["reason"] = "the parabola opens downward"
        return out
    vertex = -c1 / (2 * c2)
    if not x.min() < vertex < x.max():
        out["reason"] = "the minimum lies outside the sizes tried"
        return out
    order = np.argsort(x)
    log_d = np.interp(vertex, x[order], np.log(p.D)[order])
    out |= {
        "bracketed": True,
        "N_opt": float(math.exp(vertex)),
        "D_opt": float(math.exp(log_d)),
        "loss_opt": float(c0 + c1 * vertex + c2 * vertex**2),
    }
    return out


def _exponents(minima: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """Slopes and intercepts of ln N_opt and ln D_opt against ln C."""
    logC = np.log([m["budget"] for m in minima])
    a, ka = np.polyfit(logC, np.log([m["N_opt"] for m in minima]), 1)
    b, kb = np.polyfit(logC, np.log([m["D_opt"] for m in minima]), 1)
    return float(a), float(ka), float(b), float(kb)


def isoflop(p: Points, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    groups = sorted(set(p.group.tolist()))
    budgets = [budget_minimum(p.take(np.flatnonzero(p.group == g))) for g in groups]
    out: dict[str, Any] = {"budgets": budgets}
    bracketed = [m for m in budgets if m["bracketed"]]
    if len(bracketed) < 2:
        out["skipped"] = f"{len(bracketed)} bracketed budget(s); N_opt ∝ C^a needs at least 2"
        return out
    a, ka, b, kb = _exponents(bracketed)
    samples = []
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(p.group == g) for g in groups]
    for _ in range(bootstrap):
        minima = []
        for index in members:
            m = budget_minimum(p.take(rng.choice(index, len(index))))
            if m["bracketed"]:
                minima.append(m)
        if len(minima) >= 2:
            samples.append(_exponents(minima))
    samples_array = np.array(samples).reshape(-1, 4)
    out |= {
        "a": _interval(samples_array[:, 0], a),
        "b": _interval(samples_array[:, 2], b),
        "N_opt_coefficient": math.exp(ka),
        "D_opt_coefficient": math.exp(kb),
        "bootstrap": len(samples),
    }
    return out


# ---------------------------------------------------------------- hold-out and all fits


def holdout(p: Points, groups: int = 1) -> dict[str, Any]:
    """Fit L(N, D) without the `groups` largest-compute groups; its error on them."""
    ids = sorted(set(p.group.tolist()))
    if groups < 1 or len(ids) <= groups:
        return {"skipped": f"{len(ids)} compute group(s): nothing left to fit after the hold-out"}
    held = np.isin(p.group, ids[-groups:])
    train, test = p.take(np.flatnonzero(~held)), p.take(np.flatnonzero(held))
    reason = _enough_for_law(train)
    if reason:
        return {"skipped": f"without the held-out runs: {reason}"}
    fitted = law(fit_law(train))
    predicted = predict(fitted, test.N, test.D)
    relative = (predicted - test.loss) / test.loss
    return {
        "held_out_budgets": sorted({float(b) for b in test.budget}),
        "runs": [
            {"N": float(n), "D": float(d), "loss": float(y), "predicted": float(q)}
            for n, d, y, q in zip(test.N, test.D, test.loss, predicted, strict=True)
        ],
        "mean_abs_relative_error": float(np.mean(np.abs(relative))),
        "max_abs_relative_error": float(np.max(np.abs(relative))),
        "fit": {k: fitted[k] for k in ("E", "A", "B", "alpha", "beta")},
    }


def fit_all(
    rows: list[dict[str, Any]],
    metric: str = "eval_bpb",
    params: str = "params",
    bootstrap: int = 200,
    holdout_groups: int = 1,
) -> dict[str, Any]:
    """Every fit on the finished rows (a CSV's rows or a sweep's results)."""
    p = points(rows, metric, params)
    if len(p) == 0:
        raise SweepError(f"no finished runs with a {metric} to fit")
    return {
        "metric": metric,
        "fitted": fitted_name(metric),
        "params": params,
        "runs": len(p),
        "isoflop": isoflop(p, bootstrap),
        "parametric": parametric(p, bootstrap),
        "holdout": holdout(p, holdout_groups),
    }
