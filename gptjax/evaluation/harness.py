"""lm-evaluation-harness in-process: a gptjax run as an `lm_eval.api.model.LM`, and
`gptjax eval RUN_DIR --harness TASKS` through lm-eval's own task YAML (needs the [eval] extra).

The adapter's log-likelihoods are gptjax's scorer (gptjax/evaluation/loglik.py: the pair split
as lm-eval's hf backend splits it, the context cut from the left to the window); rolling
log-likelihoods use lm-eval's own disjoint windows of model.seq_len tokens after the
end-of-document token; generate_until is greedy decoding (gptjax/inference/generate.py) cut at
the first stop string, the prompt cut from the left to leave room for max_gen_toks.

A harness task is an lm-eval task name (its registry, plus YAML files under --include-path,
whose `dataset_path: json` + `dataset_kwargs.data_files` read local files), or a gptjax task file
or directory, which is written as a YAML task here (`task_yaml`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptjax.errors import UserError
from gptjax.evaluation import tasks as task_files
from gptjax.evaluation.loglik import Scorer, encode_pair


class HarnessError(UserError):
    """lm-eval is missing, or a harness task it cannot find."""


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.utils
    except ImportError:
        raise HarnessError(
            "--harness needs lm-evaluation-harness: pip install 'gptjax[eval]'"
        ) from None
    return lm_eval


def make_lm(setup, params, tokenizer, max_gen_toks: int = 256):
    """An lm_eval LM that scores and generates with this model (`setup` from runs.load_run)."""
    lm_eval = _lm_eval()
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from gptjax.inference import generate

    scorer = Scorer(setup, params)
    seq_len = setup.cfg.model.seq_len

    class GptjaxLM(lm_eval.api.model.LM):
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [encode_pair(tokenizer, *request.args) for request in requests]
            return [(s.logprob, s.greedy) for s in scorer.score(pairs)]

        def loglikelihood_rolling(self, requests) -> list[float]:
            windows, owner = [], []
            for k, request in enumerate(requests):
                ids = tokenizer.encode(request.args[0])
                for window in get_rolling_token_windows(ids, tokenizer.eod_id, seq_len, 1):
                    windows.append(make_disjoint_window(window))
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, score in zip(owner, scorer.score(windows), strict=True):
                totals[k] += score.logprob
            return totals

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, settings = request.args
                until = settings.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(settings.get("max_gen_toks", max_gen_toks))
                ids = tokenizer.encode(context)[-max(1, seq_len - new) :]
                text = generate.complete(
                    setup, params, tokenizer, [ids], max_new_tokens=new, temperature=0.0
                )[0]
                cuts = [text.find(s) for s in until if s and s in text]
                out.append(text[: min(cuts)] if cuts else text)
            return out

    return GptjaxLM()


def task_yaml(task: task_files.Task, source: Path, out_dir: Path) -> str:
    """Write an lm-eval YAML task reading a gptjax task's JSONL files; returns its name."""
    name = f"gptjax_{task.name}"
    split = (
        source
        if source.is_file()
        else next(source / n for n in ("test.jsonl", "validation.jsonl") if (source / n).is_file())
    )
    files = {"test": str(split.absolute())}
    if source.is_dir() and (source / "train.jsonl").is_file():
        files["train"] = str((source / "train.jsonl").absolute())
    s = task.settings
    spec: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": "train" if "train" in files else "test",
        "doc_to_text": "{{context}}",
        "target_delimiter": s.target_delimiter,
        "fewshot_delimiter": s.fewshot_delimiter,
    }
    if s.description:
        spec["description"] = s.description
    if task.kind == "choice":
        spec |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")],
        }
    else:
        spec |= {
            "output_type": "loglikelihood",
            "doc_to_target": "{{target}}",
            "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        }
    # JSON is YAML: no YAML writer needed
    (out_dir / f"{name}.yaml").write_text(json.dumps(spec, indent=1))
    return name


def evaluate(
    lm,
    names: Sequence[str],
    shots: int | None = None,
    limit: int | None = None,
    include_path: str | None = None,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on `lm`: {"results": per task, "samples": per task}."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="gptjax-harness-") as scratch:
        resolved, includes = [], [scratch] + ([include_path] if include_path else [])
        for name in names:
            path = Path(name)
            if path.suffix == ".jsonl" or path.is_dir():
                resolved.append(task_yaml(task_files.read_task(path), path, Path(scratch)))
            else:
                resolved.append(name)
        local = all(Path(n).suffix == ".jsonl" or Path(n).is_dir() for n in names)
        # lm-eval's own registry (thousands of YAML files) is read only when a task needs it
        manager = TaskManager(include_path=includes, include_defaults=not local)
        unknown = [n for n in resolved if n not in manager.all_tasks]
        if unknown:
            raise HarnessError(
                f"lm-eval has no task {', '.join(unknown)}; give its YAML with --include-path"
            )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=resolved,
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,
        )
    return {"results": out["results"], "samples": out["samples"]}


def evaluate_run(
    run_dir: str | Path,
    names: Sequence[str],
    shots: int | None = None,
    limit: int | None = None,
    step: int | None = None,
    include_path: str | None = None,
    devices=None,
    mesh: dict | None = None,
    quant: str | None = None,
) -> dict[str, Any]:
    """`gptjax eval RUN_DIR --harness TASKS`: lm-eval's results per task; each task's samples
    go to run_dir/evaluations/harness-TASK-step{S}[-int8].jsonl (`quant` "int8": int8
    weights)."""
    from gptjax.atomic import write_file
    from gptjax.training import runs
    from gptjax.training.checkpoint import Checkpointer

    _lm_eval()  # missing: one line, before loading anything
    run_dir = Path(run_dir)
    runs.read_config(run_dir)
    if step is None:
        reader = Checkpointer(run_dir, async_save=False, read_only=True)
        step = reader.latest_step()
        reader.close()
    setup, params, tokenizer = runs.load_run(run_dir, step, devices, mesh, quant)
    out = evaluate(make_lm(setup, params, tokenizer), names, shots, limit, include_path)
    tag = f"-{quant}" if quant not in (None, "none") else ""
    for name, samples in out["samples"].items():
        lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
        write_file(run_dir / "evaluations" / f"harness-{name}-step{step}{tag}.jsonl", lines)
    return {"step": step, "results": out["results"]}
