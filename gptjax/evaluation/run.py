"""Evaluate a model on tasks: the prompts of each example scored by log-likelihood.

Multiple choice (lm-eval's metrics, so the numbers compare):
  acc        argmax of log p(choice | context)
  acc_norm   argmax of log p(choice | context) / len(choice) in characters (lm-eval's acc_norm)
  acc_bytes  the same divided by the choice's UTF-8 bytes (lm-eval's acc_bytes)
  acc_uncond with `unconditional`: argmax of log p(choice | context) - log p(choice | the
             task's unconditional_context, "Answer:"), GPT-3's normalisation
Cloze: acc is greedy exact match (every target token is the model's argmax); ppl is
exp(-mean over examples of log p(target | context)) (lm-eval's perplexity for LAMBADA).
Each mean comes with its standard error, sqrt(sample variance / n). `truncated` counts the
examples whose prompt was cut from the left to fit the window (gptjax/evaluation/loglik.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.atomic import write_file
from gptjax.evaluation.builtin import resolve
from gptjax.evaluation.loglik import Scorer, encode_pair
from gptjax.evaluation.tasks import Task, TaskError


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), stderr


def _with_stderr(out: dict, name: str, values) -> None:
    out[name], out[f"{name}_stderr"] = _mean_stderr(values)


def evaluate_task(
    scorer: Scorer,
    tokenizer,
    task: Task,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 1234,
    unconditional: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary: metrics with standard errors, n, truncated, chance; one record per example)."""
    if shots < 0 or (limit is not None and limit < 1):
        raise TaskError(f"--shots {shots} / --limit {limit}: use shots >= 0 and limit >= 1")
    indices = range(min(len(task.examples), limit or len(task.examples)))
    prompts = [task.prompt(i, shots, seed) for i in indices]
    delimiter = task.settings.target_delimiter
    requests, owner = [], []  # owner: (example position, choice or -1 for the cloze target)
    for k, i in enumerate(indices):
        example = task.examples[i]
        answers = example.choices if task.kind == "choice" else (example.target,)
        for c, answer in enumerate(answers):
            requests.append(encode_pair(tokenizer, prompts[k], delimiter + answer))
            owner.append((k, c))
    if unconditional and task.kind == "choice":
        base = task.settings.unconditional_context
        for k, i in enumerate(indices):
            for c, answer in enumerate(task.examples[i].choices):
                requests.append(encode_pair(tokenizer, base, delimiter + answer))
                owner.append((k, -1 - c))
    for (k, _), (_, continuation) in zip(owner, requests, strict=True):
        if len(continuation) > scorer.seq_len:
            raise TaskError(
                f"task {task.name}, example {indices[k]}: its answer is {len(continuation)} "
                f"tokens, more than the model's window of {scorer.seq_len}"
            )
    scores = scorer.score(requests)
    per = [dict(index=i, scores=[], greedy=[], truncated=False) for i in indices]
    for (k, c), score in zip(owner, scores, strict=True):
        if c >= 0:
            per[k]["scores"].append(score.logprob)
            per[k]["greedy"].append(score.greedy)
            per[k]["truncated"] |= score.truncated
        else:
            per[k].setdefault("unconditional", []).append(score.logprob)
    records = []
    for k, i in enumerate(indices):
        example, item = task.examples[i], per[k]
        record = {"index": i, "truncated": item["truncated"]}
        if task.kind == "choice":
            lls = np.array(item["scores"])
            chars = np.array([len(c) for c in example.choices], np.float64)
            nbytes = np.array([len(c.encode()) for c in example.choices], np.float64)
            predictions = {
                "acc": int(np.argmax(lls)),
                "acc_norm": int(np.argmax(lls / chars)),
                "acc_bytes": int(np.argmax(lls / nbytes)),
            }
            if "unconditional" in item:
                predictions["acc_uncond"] = int(np.argmax(lls - np.array(item["unconditional"])))
                record["unconditional"] = item["unconditional"]
            record.update(label=example.label, scores=item["scores"], predictions=predictions)
            record.update({m: float(p == example.label) for m, p in predictions.items()})
        else:
            record.update(target=example.target, logprob=item["scores"][0])
            record["acc"] = float(item["greedy"][0])
        records.append(record)
    summary: dict[str, Any] = {"n": len(records), "shots": shots}
    metrics = [m for m in ("acc", "acc_norm", "acc_bytes", "acc_uncond") if m in records[0]]
    for metric in metrics:
        _with_stderr(summary, metric, [r[metric] for r in records])
    if task.kind == "cloze":
        mean_ll, ll_stderr = _mean_stderr([r["logprob"] for r in records])
        summary["ppl"] = math.exp(min(-mean_ll, 700))
        summary["ppl_stderr"] = summary["ppl"] * ll_stderr  # the delta method
    else:
        summary["chance"] = float(np.mean([1 / len(task.examples[i].choices) for i in indices]))
    summary["truncated"] = sum(r["truncated"] for r in records)
    return summary, records


def evaluate(
    scorer: Scorer,
    tokenizer,
    tasks: Sequence[Task],
    shots: int = 0,
    limit: int | None = None,
    seed: int = 1234,
    unconditional: bool = False,
    log_dir: str | Path | None = None,
    tag: str = "",
) -> dict[str, dict[str, Any]]:
    """{task name: summary} for each task (tasks.resolve gives one from a name or path); with
    `log_dir`, each task's per-example records go to log_dir/TASK{tag}.jsonl."""
    results = {}
    for task in tasks:
        summary, records = evaluate_task(scorer, tokenizer, task, shots, limit, seed, unconditional)
        results[task.name] = summary
        if log_dir is not None:
            lines = "".join(json.dumps(r) + "\n" for r in records)
            write_file(Path(log_dir) / f"{task.name}{tag}.jsonl", lines)
    return results


def evaluate_run(
    run_dir: str | Path,
    names: Sequence[str],
    shots: int = 0,
    limit: int | None = None,
    step: int | None = None,
    seed: int = 1234,
    unconditional: bool = False,
    devices=None,
    mesh: dict | None = None,
    write_log: bool = True,
    quant: str | None = None,
) -> dict[str, Any]:
    """Load a run's checkpoint (newest, or `step`) on `devices`/`mesh` (runs.load_run; `quant`
    "int8": int8 weights) and evaluate it; the per-example logs go to
    run_dir/evaluations/TASK-{shots}shot-step{S}[-int8].jsonl.
    """
    from gptjax.training import runs
    from gptjax.training.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    cfg = runs.read_config(run_dir)
    tasks = [resolve(name, val_fraction=cfg.data.val_fraction) for name in names]  # errors first
    if step is None:
        reader = Checkpointer(run_dir, async_save=False, read_only=True)
        step = reader.latest_step()
        reader.close()
    setup, params, tokenizer = runs.load_run(run_dir, step, devices, mesh, quant)
    scorer = Scorer(setup, params)
    log_dir = run_dir / "evaluations" if write_log else None
    results = evaluate(
        scorer,
        tokenizer,
        tasks,
        shots,
        limit,
        seed,
        unconditional,
        log_dir,
        f"-{shots}shot-step{step}" + (f"-{quant}" if quant not in (None, "none") else ""),
    )
    return {"step": step, "tasks": results}
