"""`gptjax sweep plan|run|status|report|fit|emit`: the commands of a scaling experiment.

gptjax sweep plan SPEC            the runs: parameters, tokens, FLOPs, estimated time
gptjax sweep run SPEC [--workers N | --index I] [key=value ...]
gptjax sweep status SPEC          each run's status and the sweep's progress
gptjax sweep report SPEC          DIR/results.csv, DIR/fits.json and the plots in DIR
gptjax sweep fit RESULTS.csv      the fits on any CSV with the results.csv columns
gptjax sweep emit slurm|k8s SPEC  a SLURM array script / Kubernetes Indexed Job
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ASSUMED_MFU = 0.3  # for time estimates before any run of the sweep has finished


def _plan(args) -> int:
    from gptjax.experiments import runs, spec

    sweep = spec.load(args.spec)
    rows = [runs.result_row(run, runs.read_state(run)) for run in sweep.runs]
    rate, source = _rate(rows, args.flops_per_second, sweep)
    for row in rows:
        left = row["flops"] * (1 - row["step"] / row["steps"]) if row["steps"] else 0
        row["seconds_left"] = left / rate
    total = sum(r["seconds_left"] for r in rows) / args.workers
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(sweep.directory),
                    "digest": sweep.digest,
                    "flops_per_second": rate,
                    "estimate": source,
                    "runs": [_plan_row(r, run) for r, run in zip(rows, sweep.runs, strict=True)],
                }
            )
        )
        return 0
    print(
        f"sweep {sweep.directory}: {len(rows)} runs, {sum(r['flops'] for r in rows):.3g} FLOPs "
        f"(gptjax's count: 6N + attention), plan {sweep.digest}"
    )
    print(
        f"{'#':>4} {'run':<10} {'params':>12} {'non-emb':>12} {'tokens':>13} {'steps':>7} "
        f"{'FLOPs':>9} {'time':>6}  {'status':<12}label"
    )
    for run, row in zip(sweep.runs, rows, strict=True):
        print(
            f"{run.index:>4} {run.name:<10} {row['params']:>12,} "
            f"{row['non_embedding_params']:>12,} {row['tokens']:>13,} {row['steps']:>7} "
            f"{row['flops']:>9.2e} {_duration(row['seconds_left']):>6}  {row['status']:<12}"
            f"{run.label}"
        )
    print(
        f"time left with {args.workers} worker(s): about {_duration(total)} ({source}; "
        "compile and evaluation not included)"
    )
    return 0


def _plan_row(row: dict, run) -> dict:
    return {"index": run.index, "label": run.label, "run_dir": str(run.directory), **row}


def _rate(rows: list[dict], given: float | None, sweep) -> tuple[float, str]:
    """FLOP/s per run: given, else measured on this sweep's finished runs, else assumed."""
    if given:
        return given, f"{given:.3g} FLOP/s given"
    done = [r for r in rows if r["status"] == "finished" and r["wall_seconds"]]
    if done:
        rate = sum(r["flops"] for r in done) / sum(r["wall_seconds"] for r in done)
        return rate, f"{rate / 1e9:.3g} GFLOP/s per run, measured on {len(done)} finished runs"
    from gptjax.core import flops
    from gptjax.data.pipeline import cache_root

    # the peak measured once per machine and cached, as training does
    peak, where = flops.peak_flops(None, cache_root(sweep.runs[0].config.data))
    return ASSUMED_MFU * peak, f"assumed {ASSUMED_MFU:.0%} of {peak / 1e9:.4g} GFLOP/s ({where})"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _run(args) -> int:
    from gptjax.experiments import pool, spec

    sweep = spec.load(args.spec)
    spec.execution_overrides(args.overrides)  # checked: only settings that leave the names alone
    if args.index is not None:
        return pool.run_index(
            sweep, args.index, args.overrides, args.retry_failed, args.plan, args.dry_run
        )
    if args.dry_run:
        raise spec.SweepError("--dry-run goes with --index (it shows that run's command)")
    return pool.run_sweep(
        sweep, args.workers, args.overrides, not args.no_progress, args.retry_failed
    )


def _status(args) -> int:
    from gptjax.experiments import runs, spec

    sweep = spec.load(args.spec)
    states = [runs.read_state(run, sweep.spec.score) for run in sweep.runs]
    counts = {s: sum(st.status == s for st in states) for s in runs.STATUSES}
    total = sum(run.config.train.steps for run in sweep.runs)
    done = sum(
        min(st.step, run.config.train.steps) for st, run in zip(states, sweep.runs, strict=True)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(sweep.directory),
                    "counts": counts,
                    "steps_done": done,
                    "steps": total,
                    "runs": [
                        {
                            "index": run.index,
                            "run": run.name,
                            "label": run.label,
                            "steps": run.config.train.steps,
                            **vars(st),
                        }
                        for run, st in zip(sweep.runs, states, strict=True)
                    ],
                }
            )
        )
        return 0
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(
        f"sweep {sweep.directory}: {len(sweep.runs)} runs: {summary}; "
        f"{100 * done / max(total, 1):.0f}% of {total:,} steps"
    )
    print(f"{'#':>4} {'run':<11}{'status':<12}{'step':>11}{'bpb':>8}  label")
    for run, st in zip(sweep.runs, states, strict=True):
        bpb = f"{st.eval_bpb:.4f}" if st.eval_bpb is not None else "-"
        print(
            f"{run.index:>4} {run.name:<11}{st.status:<12}"
            f"{f'{st.step}/{run.config.train.steps}':>11}{bpb:>8}  {run.label}"
        )
        if st.error:
            print(f"{'':>16}{st.error}")
    if sweep.spec.score == "held_out":
        print("bpb: on the whole held-out set (a finished run's '-': `sweep report` scores it)")
    return 0


def _fit_and_print(rows, args, out: Path | None) -> dict:
    from gptjax.experiments import fit, report

    result = fit.fit_all(rows, args.metric, args.params, args.bootstrap, args.holdout)
    written = report.plots(rows, result, out) if out is not None else []
    if args.json:
        print(json.dumps(result | {"plots": [str(p) for p in written]}))
    else:
        print(report.format_fits(result))
        for path in written:
            print(f"wrote {path}")
    return result


def _report(args) -> int:
    from gptjax.experiments import report, runs, spec

    sweep = spec.load(args.spec)
    options = sweep.spec.fit
    for name in ("metric", "params", "bootstrap", "holdout"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(options, name))
    rows = []
    for run in sweep.runs:
        state = runs.read_state(run, sweep.spec.score)
        if (
            sweep.spec.score == "held_out"
            and state.status == "finished"
            and state.eval_loss is None
        ):
            print(f"scoring {run.name} on the whole held-out set", file=sys.stderr, flush=True)
            score = runs.score_held_out(run)
            state = dataclasses.replace(
                state, eval_loss=score["eval_loss"], eval_bpb=score["eval_bpb"]
            )
        rows.append(runs.result_row(run, state))
    path = report.write_csv(rows, sweep.directory / "results.csv")
    if not args.json:
        print(report.format_table(rows))
        print(f"wrote {path}")
    if not any(r["status"] == "finished" for r in rows):
        print("gptjax: no finished runs yet: nothing to fit", file=sys.stderr)
        return 0
    result = _fit_and_print(rows, args, None if args.no_plots else sweep.directory)
    (sweep.directory / "fits.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _fit(args) -> int:
    from gptjax.experiments import report

    rows = report.read_csv(args.results)
    for name, default in (
        ("metric", "eval_bpb"),
        ("params", "params"),
        ("bootstrap", 200),
        ("holdout", 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    _fit_and_print(rows, args, Path(args.plots) if args.plots else None)
    return 0


def _emit(args) -> int:
    from gptjax.experiments import emit, spec

    sweep = spec.load(args.spec)
    if args.kind == "slurm":
        text = emit.slurm(
            sweep,
            args.spec,
            args.nodes,
            args.gpus_per_node,
            args.cpus_per_task,
            args.time,
            args.parallel,
        )
    else:
        text = emit.kubernetes(sweep, args.spec, args.image, args.gpus_per_node, args.parallel)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        print(f"wrote {out} ({len(sweep.runs)} runs)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        default=None,
        help="the loss to fit: eval_bpb, eval_loss, or a train.eval_tasks column such as "
        "eval/TASK/acc (fitted as its error, 1 - acc) (default: the spec's fit.metric, "
        "else eval_bpb)",
    )
    p.add_argument(
        "--params",
        choices=("params", "non_embedding_params"),
        default=None,
        help="N: all parameters (Chinchilla) or without embeddings (Kaplan)",
    )
    p.add_argument("--bootstrap", type=int, default=None, help="resamples for the intervals")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="largest-compute groups held out to test the fit's predictions",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")


def add_arguments(top: argparse.ArgumentParser) -> None:
    commands = top.add_subparsers(dest="sweep_command", required=True)

    p = commands.add_parser("plan", help="the runs: parameters, tokens, FLOPs, estimated time")
    p.add_argument("spec")
    p.add_argument("--workers", type=int, default=1, help="for the time estimate")
    p.add_argument(
        "--flops-per-second",
        type=float,
        default=None,
        help="per run, for the estimate (default: measured on finished runs)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_plan)

    p = commands.add_parser("run", help="run every run not yet finished (or one: --index)")
    p.add_argument("spec")
    p.add_argument(
        "overrides",
        nargs="*",
        help="execution settings only (mesh.*, checkpoint.*, train.stop_at, ...)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at once; on CPU they split the cores, on GPUs one GPU each",
    )
    p.add_argument(
        "--index",
        type=int,
        default=None,
        help="run only run I (a SLURM array or Kubernetes Indexed Job task)",
    )
    p.add_argument(
        "--plan", default=None, help="with --index: the plan digest the job was written for"
    )
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument(
        "--dry-run", action="store_true", help="with --index: print the run and its command"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run)

    p = commands.add_parser("status", help="each run's status and the sweep's progress")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_status)

    p = commands.add_parser(
        "report", help="results.csv, fits (fits.json) and plots in the sweep dir"
    )
    p.add_argument("spec")
    p.add_argument("--no-plots", action="store_true")
    _fit_options(p)
    p.set_defaults(run=_report)

    p = commands.add_parser("fit", help="IsoFLOP, parametric and hold-out fits on a results CSV")
    p.add_argument("results")
    p.add_argument("--plots", default=None, help="also write the PNGs into this directory")
    _fit_options(p)
    p.set_defaults(run=_fit)

    p = commands.add_parser("emit", help="a SLURM array script or Kubernetes Indexed Job")
    p.add_argument("kind", choices=("slurm", "k8s"))
    p.add_argument("spec")
    p.add_argument("--out", default=None, help="file to write (default: stdout)")
    p.add_argument("--nodes", type=int, default=1, help="SLURM: nodes per run")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (k8s: per pod)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="SLURM")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit per run")
    p.add_argument("--parallel", type=int, default=0, help="runs at once (0: no limit)")
    p.add_argument("--image", default="ghcr.io/YOUR_ORG/gptjax:latest", help="k8s image")
    p.set_defaults(run=_emit)
