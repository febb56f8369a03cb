"""`train.eval_tasks`: tasks scored by the training loop at every eval_every and at the end.

The loop (gptjax/training/loop.py) sits below this package, so it takes the evaluator as an
argument: `gptjax train` passes `TrainingTasks(cfg)`, and so does `train(cfg)` here, the
Python entry point for a config with eval_tasks. The tasks are resolved when it is made (an
unknown task or a bad task file is one line before the run directory is touched); the scorer
is built on the training setup's mesh at the first evaluation and reused, the parameters being
the training state's own (no copy, no checkpoint round trip).

Each task logs, in the eval record of its step: eval/TASK/acc with eval/TASK/acc_stderr, and
eval/TASK/acc_norm (multiple choice) or eval/TASK/ppl (cloze); the per-example records go to
run_dir/evaluations/TASK-{shots}shot-step{S}.jsonl, the same files `gptjax eval` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from gptjax.config import Config
from gptjax.evaluation.builtin import resolve
from gptjax.evaluation.loglik import Scorer
from gptjax.evaluation.run import evaluate

LOGGED = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "ppl")


class TrainingTasks:
    """The loop's task evaluator: `evaluator(setup, params, tokenizer, step, run_dir)` ->
    {"eval/TASK/METRIC": value}. Every process of a job calls it; process 0 writes the logs."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.shots, self.limit = t.eval_shots, t.eval_limit
        self.tasks = [resolve(name, val_fraction=cfg.data.val_fraction) for name in t.eval_tasks]
        self.scorer: Scorer | None = None

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __call__(self, setup, params, tokenizer, step: int, run_dir: Path) -> dict[str, Any]:
        if self.scorer is None or self.scorer.setup is not setup:
            self.scorer = Scorer(setup, params)
        self.scorer.params = params
        log_dir = Path(run_dir) / "evaluations" if jax.process_index() == 0 else None
        results = evaluate(
            self.scorer,
            tokenizer,
            self.tasks,
            self.shots,
            self.limit,
            log_dir=log_dir,
            tag=f"-{self.shots}shot-step{step}",
        )
        return {
            f"eval/{name}/{metric}": summary[metric]
            for name, summary in results.items()
            for metric in LOGGED
            if metric in summary
        }


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """gptjax.training.loop.train with the config's train.eval_tasks scored as it trains."""
    from gptjax.training import loop

    return loop.train(cfg, progress, task_eval=TrainingTasks(cfg))
