"""`train.distill_from: RUN_DIR[@STEP]`: the frozen teacher of a distillation run (the loss:
gptjax/core/distill.py).

The teacher's parameters are read alone (no optimiser state), on the student's mesh and rules
but sharded by the teacher's own model config (its shapes may differ from the student's in
everything but the tokenizer). A new student run takes the teacher's tokenizer; a student
whose tokenizer differs (its own data.tokenizer, a resumed run, train.init_from's) is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptjax.config import Config, ConfigError
from gptjax.core import distill, steps
from gptjax.data import tokenizer as tok
from gptjax.training import runs


def source(cfg: Config) -> tuple[Path, int | None]:
    """(teacher run directory, step or None for its newest), checked before anything is
    written: a run directory with a tokenizer."""
    spec = cfg.train.distill_from
    if cfg.train.objective != "lm":
        raise ConfigError(
            f"train.distill_from distils the language-model loss: it cannot go with "
            f"train.objective={cfg.train.objective}"
        )
    path, at, step = spec.rpartition("@")
    if not (at and step.isdigit()):
        path, step = spec, None
    where = Path(path)
    try:
        runs.read_config(where)
    except ConfigError as error:
        raise ConfigError(f"train.distill_from={spec}: {error}") from None
    if tok.find(where) is None:
        raise ConfigError(f"train.distill_from={spec}: {where} holds no tokenizer")
    return where, None if step is None else int(step)


def check_tokenizer(cfg: Config, teacher_dir: Path, tokenizer) -> None:
    """ConfigError unless the student's `tokenizer` is the teacher's (the same file)."""
    theirs = tok.find(teacher_dir)
    if theirs.read_bytes() != tokenizer.model_bytes:
        raise ConfigError(
            f"train.distill_from={cfg.train.distill_from}: the teacher's tokenizer ({theirs}) "
            "is not the student's; teacher and student must share one (a new run without "
            "data.tokenizer takes the teacher's)"
        )


@dataclass
class Distill:
    """The distillation objective for steps.make_train_step: the teacher's parameters are the
    step's extra input (`inputs`, sharded by `shardings`)."""

    setup: steps.Setup  # the student's
    teacher: distill.Teacher

    @property
    def inputs(self):
        return self.teacher.params

    @property
    def shardings(self):
        return self.teacher.shardings

    def loss_and_grads(self, params, batch, micro_batches, key, teacher_params):
        segments = self.setup.cfg.data.packing == "segments"
        frozen = self.teacher._replace(params=teacher_params)
        loss, grads, count, figures = steps.loss_and_grads(
            self.setup.graphdef, params, batch, micro_batches, key, segments, teacher=frozen
        )
        return loss, grads, count, {f"moe/{name}": value for name, value in figures.items()}


def load(cfg: Config, setup: steps.Setup, where: tuple[Path, int | None]) -> Distill:
    """The distillation objective: the teacher's parameters on `setup`'s devices and mesh,
    sharded by its own model."""
    teacher_dir, step = where
    saved = runs.read_config(teacher_dir)
    teacher_cfg = cfg.model_copy(update={"model": saved.model})
    teacher_setup = steps.build_model(teacher_cfg, list(setup.mesh.devices.flat))
    params = runs.restore_params(teacher_dir, step, teacher_setup)
    frozen = distill.Teacher(
        teacher_setup.graphdef,
        params,
        teacher_setup.param_shardings,
        cfg.train.distill_alpha,
        cfg.train.distill_temperature,
    )
    return Distill(setup, frozen)
