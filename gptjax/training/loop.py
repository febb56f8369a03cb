"""The training loop: the only module that knows about everything.

The step library (gptjax/core/steps.py) builds and jits the steps; this module adds the data (the
batch of step s is built per process from s alone), checkpoints, evaluation, metrics, the
preemption guard and the profiler around them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from gptjax import distributed
from gptjax.config import Config, ConfigError
from gptjax.core import flops, steps
from gptjax.data import loader as data_loader
from gptjax.data import sources
from gptjax.data import tokenizer as tok
from gptjax.data.pipeline import cache_root
from gptjax.training import align, checkpoint, debug, metrics, runlock, runs, teacher
from gptjax.training.faults import NonFiniteSteps, PreemptionGuard
from gptjax.training.monitor import StepMonitor

# train.eval_tasks: (setup, params, tokenizer, step, run_dir) -> {"eval/TASK/METRIC": value},
# gptjax.evaluation.during_training.TrainingTasks (a layer above: passed in, never imported)
TaskEval = Callable[..., dict[str, Any]]


def train(cfg: Config, progress: bool = True, task_eval: TaskEval | None = None) -> dict[str, Any]:
    """Train (or resume) the run in cfg.run_dir; returns the last train and eval metrics.
    With train.eval_tasks, `task_eval` scores them at each evaluation (`gptjax train` and
    gptjax.evaluation.during_training.train pass it)."""
    if cfg.train.eval_tasks and task_eval is None:
        raise ConfigError(
            "train.eval_tasks needs the task evaluator: run `gptjax train`, or call "
            "gptjax.evaluation.during_training.train(cfg)"
        )
    cfg = debug.apply(cfg)  # --debug: one device
    distributed.initialize(cfg)  # several processes: join them (before any device is touched)
    with debug.session(cfg):  # debug flags and the step watchdog
        return _train(cfg, progress, task_eval)


class Profiler:
    """`train.profile_steps=[a, b]`: a JAX profiler trace of steps a..b into run_dir/profile."""

    def __init__(self, steps: list[int] | None, directory: Path):
        self.steps, self.directory, self.tracing = steps, directory, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps[1]:
            self.close(state)

    def close(self, state) -> None:
        if self.tracing:  # also when the run ends inside the profiled steps
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False


def _train(cfg: Config, progress: bool, task_eval: TaskEval | None) -> dict[str, Any]:
    setup = steps.build(cfg, debug.devices(cfg))  # config/mesh errors first, before the disk
    sources.check(cfg.data)
    init = runs.init_source(cfg) if cfg.train.init_from else None  # (source run, step)
    reference = align.check(cfg)  # train.objective=dpo: the frozen reference (run, step)
    distill = teacher.source(cfg) if cfg.train.distill_from else None  # (teacher run, step)
    # a failure before anything is written (a missing data file) removes a new run_dir again
    with runs.new_or_existing(cfg) as run_dir, runlock.hold(run_dir):  # one writer at a time
        return _run(cfg, setup, run_dir, progress, init, task_eval, reference, distill)


def _run(
    cfg: Config,
    setup: steps.Setup,
    run_dir: Path,
    progress: bool,
    init,
    task_eval,
    reference,
    distill=None,
) -> dict[str, Any]:
    lead = jax.process_index() == 0
    data = _open_run(cfg, run_dir, progress and lead, init, lead, distill)
    ckpt = checkpoint.Checkpointer(
        run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_, cfg.checkpoint.keep_period
    )
    state, start = _starting_state(cfg, setup, run_dir, ckpt, init, lead)
    monitor = StepMonitor(cfg, setup, lead)  # watchdog; debug timings and NaN checks
    objective = align.objective(cfg, setup, run_dir, reference, lead, data)  # None: LM loss
    step_objective = objective and objective.step
    if distill:  # train.distill_from: the frozen teacher, parameters only
        step_objective = teacher.load(cfg, setup, distill)
    train_step = monitor.wrap(steps.make_train_step(setup, step_objective))
    eval_step = monitor.wrap(steps.make_eval_step(setup, data.token_bytes), "eval")
    log = _step_logger(cfg, setup, run_dir, start, progress and lead, lead, monitor)
    late = _LateReport(log, NonFiniteSteps(cfg.train.max_bad_steps))
    # Steps step+1 .. step+prefetch are read and transferred while step `step` runs.
    batches = data_loader.Prefetcher(
        _batch_reader(cfg, setup, data), cfg.data.prefetch, stop=cfg.train.steps
    )

    def evaluate(step, params):
        result = steps.evaluate(setup, eval_step, params, data, cfg.train.eval_steps)
        if objective:  # the held-out pairs
            result |= objective.evaluate(params, data)
        if task_eval:  # train.eval_tasks, in the same record
            result |= task_eval(setup, params, data.tokenizer, step, run_dir)
        log.eval(step, result)

    if init and start == 0:  # the starting point's loss on this data, before any update
        evaluate(0, state["params"])

    profiler = Profiler(cfg.train.profile_steps, run_dir / "profile")
    guard = PreemptionGuard(sync_every=cfg.train.log_every)
    try:
        guard.install()
        # train.stop_at: end early (with a checkpoint) on the schedule of all train.steps
        end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
        for step in range(start, end):
            done = step + 1  # steps are numbered by the updates completed, as in metrics.jsonl
            monitor.begin(step)
            profiler.before(done)
            state, stats = train_step(state, batches.get(step))
            if step == start:  # the first call compiled synchronously: keep that out of tokens/s
                log.restart_window()
            profiler.after(done, state)
            late.hold(done, stats)  # reports step n-1's numbers while step n runs
            log.dispatched()
            is_last = done == cfg.train.steps
            if _every(cfg.train.eval_every, done) or is_last:
                late.flush()
                with monitor.phase("eval"):
                    evaluate(done, state["params"])
            stop = guard.should_stop(done) or done == cfg.train.stop_at
            if _every(cfg.checkpoint.every, done) or is_last or stop:
                with monitor.phase("checkpoint"):
                    ckpt.save(done, state, cfg.to_dict())
            if stop:
                with monitor.phase("checkpoint"):
                    ckpt.wait()
                if cfg.debug.enabled and done == cfg.train.stop_at:  # debug mode's few steps
                    log.say(
                        f"gptjax: debug mode stopped at step {done} of {cfg.train.steps:,}; "
                        "checkpoint saved"
                    )
                else:
                    log.say(
                        f"gptjax: stopped at step {done}; checkpoint saved, run the same "
                        "command to resume"
                    )
                    log.last["preempted"] = True
                break
        late.flush()
        profiler.close(state)
    finally:
        batches.close()
        monitor.close()
        ckpt.close()  # waits for an asynchronous save in flight
        guard.uninstall()  # only now: a stop signal must not cut that save short
        log.close()
    last = log.last
    last["final_step"] = int(jax.device_get(state["step"]))
    return last


def _every(period: int, done: int) -> bool:
    """Whether step `done` is one of every `period` (0: never)."""
    return bool(period) and done % period == 0


def _open_run(cfg: Config, run_dir: Path, progress: bool, init, lead: bool, distill=None):
    """The run's data; the config and tokenizer saved in run_dir (by the lead process). A new
    run takes the tokenizer of init_from's run, else of distill_from's, which must be the one
    the run uses (checked before anything is written)."""
    changed = runs.check_resume(run_dir, cfg)
    if changed and lead:
        print(f"gptjax: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
    source = init or distill
    source_tokenizer = tok.find(source[0]) if source else None
    data = runs.load_data(cfg, run_dir, progress, source_tokenizer)
    if distill:
        teacher.check_tokenizer(cfg, distill[0], data.tokenizer)
    if lead and (table := runs.mixture_table(cfg, data)):
        print(table, file=sys.stderr)
    if lead:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if tok.find(run_dir) is None:
            data.tokenizer.save(run_dir / data.tokenizer.filename)
    return data


def _starting_state(cfg: Config, setup: steps.Setup, run_dir: Path, ckpt, init, lead: bool):
    """(state, step): the newest valid checkpoint; else the source's parameters with a fresh
    optimiser (train.init_from); else a fresh initialisation."""
    restored = ckpt.restore_newest_valid(setup.abstract_state)
    if restored is not None:
        start, state = restored
        if lead:
            print(f"gptjax: resumed {run_dir} at step {start}", file=sys.stderr)
        return state, start
    if init:  # fine-tuning: the source's parameters, a fresh optimiser
        state = steps.fresh_state(setup, runs.restore_params(*init, setup))
        if lead:
            print(f"gptjax: starting from the parameters of {cfg.train.init_from}", file=sys.stderr)
        return state, 0
    return steps.init_state(setup), 0


def _step_logger(cfg, setup, run_dir, start: int, progress: bool, lead: bool, monitor):
    return metrics.StepLogger(
        metrics.MetricsWriter(run_dir, enabled=lead),
        tokens_per_step=cfg.train.batch_size * cfg.model.seq_len,
        flops_per_token=flops.flops_per_token(cfg.model),
        peak_flops=flops.peak_flops(list(setup.mesh.devices.flat), cache_root(cfg.data))[0],
        log_every=cfg.train.log_every,
        total_steps=cfg.train.steps,
        start_step=start,
        progress=progress,
        completed=monitor.done_at,  # debug mode runs steps synchronously: their real end times
    )


def _batch_reader(cfg: Config, setup: steps.Setup, data):
    """step -> the global batch of that step; each process reads only its own rows, once."""
    B = cfg.train.batch_size

    def batch_for(step):
        rows = lambda a, b: data.train_batch(cfg.seed, step, B, a, b)
        return data_loader.assemble(setup.batch_sharding, (B, cfg.model.seq_len), rows)

    return batch_for


class _LateReport:
    """A step's numbers are read one step late, so the device never waits on the host."""

    def __init__(self, log: metrics.StepLogger, bad_steps: NonFiniteSteps):
        self.log, self.bad_steps = log, bad_steps
        self.pending = None  # (step, stats) of the step dispatched before the current one

    def hold(self, step: int, stats) -> None:
        """Report the step held so far, then hold this one."""
        self.flush()
        self.pending = (step, stats)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, stats = self.pending
        self.pending = None
        record = {k: float(v) for k, v in stats.items()}
        for line in self.bad_steps.update(step, bool(record.pop("skipped"))):
            self.log.say(line)
        self.log.train(step, {**record, "bad_steps": self.bad_steps.total})
