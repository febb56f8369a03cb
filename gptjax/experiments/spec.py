"""The sweep spec (configs/sweeps/*.yaml) and its expansion into resolved, hash-named runs.

    base: configs/quickstart.yaml      # a gptjax config (from the working directory, else
                                       # from the spec's own folder)
    dir: runs/sweeps/NAME              # the sweep directory (default runs/sweeps/<spec stem>)
    overrides: {train.eval_every: 0}   # dotted keys applied to every run
    grid:                              # the cartesian product of its axes: a dotted key and
      optim.lr: [1.0e-3, 2.0e-3]       # its values, or any name whose values are mappings
      size:                            # of dotted keys that change together
        - {model.d_model: 64, model.n_head: 2}
        - {model.d_model: 128, model.n_head: 4}
    isoflop:                           # or: compute budgets x candidate shapes; each run's
      budgets: [1.0e12, 3.0e12]        # train.steps follows from its budget and gptjax's own
      shapes: [{model.n_layer: 2, model.d_model: 64}, ...]   # FLOPs per token
      min_steps: 20                    # a shape with fewer steps at a budget is left out
    lr_rule: {lr: 2.0e-3, d_model: 256, power: 1.0}   # optim.lr = lr * (256 / d_model)^power
    warmup_fraction: 0.1               # optim.warmup_steps as a share of each run's steps
    fit: {metric: eval_bpb, params: params, bootstrap: 200, holdout: 1}
    score: final                       # or held_out: `report` scores each finished run on the
                                       # whole held-out set (held_out.json in its directory)

Each run is the base config plus the overrides plus its grid point (or budget and shape), checked
by gptjax's own config validation. Its directory is DIR/<hash>, the hash of the resolved
settings that differ from gptjax's defaults, without those that only decide how a run executes
(EXECUTION_KEYS: mesh, checkpoints, remat, ...): the same run keeps its name on a laptop and on
a cluster, and after an upgrade that adds config keys.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptjax import config as config_module
from gptjax.config import Config, ConfigError
from gptjax.core import flops
from gptjax.errors import UserError

# Settings that decide how a run executes, not what it computes: left out of the run's name and
# free to change between attempts (`gptjax sweep run SPEC key=value` may set only these).
EXECUTION_KEYS = (
    "run_dir",
    "mesh",
    "checkpoint",
    "distributed",
    "debug",
    "train.stop_at",
    "train.step_timeout",
    "train.profile_steps",
    "train.log_every",
    "train.micro_batches",
    "data.prefetch",
    "data.cache_dir",
    "data.tfds_data_dir",
    "model.remat",
    "model.attention",
    "model.scan_layers",
    "model.loss_chunk",
)


class SweepError(UserError):
    """A mistake in a sweep spec or a sweep command; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IsoFlop(_Section):
    budgets: list[float] = Field(min_length=1, description="training FLOPs per run")
    shapes: list[dict[str, Any]] = Field(min_length=1, description="dotted-key overrides")
    min_steps: int = Field(10, gt=0, description="fewer steps at a budget: shape left out")

    @model_validator(mode="after")
    def _check(self) -> IsoFlop:
        if any(not budget > 0 for budget in self.budgets):
            raise ValueError(f"isoflop.budgets must be positive FLOPs (got {self.budgets})")
        if any(not shape for shape in self.shapes):
            raise ValueError("isoflop.shapes: an empty shape; give each shape its model.* keys")
        return self


class LrRule(_Section):
    lr: float = Field(gt=0, description="the learning rate at width d_model")
    d_model: int = Field(gt=0, description="the reference width")
    power: float = Field(1.0, description="optim.lr = lr * (d_model / width) ** power")


# a train.eval_tasks number a fit takes (gptjax/experiments/fit.py: an accuracy as 1 - acc)
TASK_METRIC = re.compile(r"eval/[^/]+/(acc|acc_norm|acc_bytes|acc_uncond|ppl)")


def metric_problem(metric: str) -> str | None:
    if metric in ("eval_bpb", "eval_loss") or TASK_METRIC.fullmatch(metric):
        return None
    return (
        f"metric {metric!r}: use eval_bpb, eval_loss or a train.eval_tasks number "
        "(eval/TASK/acc, eval/TASK/acc_norm, eval/TASK/ppl)"
    )


class FitOptions(_Section):
    metric: str = Field(
        "eval_bpb",
        description="eval_bpb, eval_loss, or a train.eval_tasks number: eval/TASK/acc or "
        "eval/TASK/acc_norm (fitted as the error, 1 - acc), eval/TASK/ppl",
    )
    params: Literal["params", "non_embedding_params"] = "params"
    bootstrap: int = Field(200, ge=0, description="resamples for the intervals; 0: none")
    holdout: int = Field(1, ge=0, description="largest-compute groups held out; 0: none")

    @model_validator(mode="after")
    def _check(self) -> FitOptions:
        if problem := metric_problem(self.metric):
            raise ValueError(problem)
        return self


class Spec(_Section):
    base: str
    dir: str | None = None
    overrides: dict[str, Any] = {}
    grid: dict[str, list[Any]] | None = None
    isoflop: IsoFlop | None = None
    lr_rule: LrRule | None = None
    warmup_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    fit: FitOptions = FitOptions()
    # final: the run's own last evaluation (train.eval_steps x train.batch_size windows);
    # held_out: the whole held-out set, the same text for every run whatever its batch size
    score: Literal["final", "held_out"] = "final"

    @model_validator(mode="after")
    def _check(self) -> Spec:
        if (self.grid is None) == (self.isoflop is None):
            raise ValueError("a sweep spec needs exactly one of 'grid' or 'isoflop'")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("grid has no axes: add e.g. 'optim.lr: [1.0e-3, 2.0e-3]'")
            for axis, values in self.grid.items():
                if not values:
                    raise ValueError(f"grid axis '{axis}' has no values")
            if self.lr_rule is not None and "optim.lr" in self.grid:
                raise ValueError("use either the grid axis optim.lr or lr_rule, not both")
        return self


@dataclass(frozen=True)
class Run:
    """One point of the sweep: its place in the plan, name, choices and resolved config."""

    index: int
    name: str
    label: str  # the choices that make this run, e.g. "model.d_model=64 optim.lr=0.002"
    config: Config
    budget: float | None  # the IsoFLOP budget it belongs to

    @property
    def directory(self) -> Path:
        return Path(self.config.run_dir)


@dataclass(frozen=True)
class Sweep:
    path: Path  # the spec file
    spec: Spec
    directory: Path
    runs: tuple[Run, ...]

    @property
    def digest(self) -> str:
        """A short hash of the ordered run names: cluster tasks check they index the same plan."""
        return hashlib.sha256(" ".join(r.name for r in self.runs).encode()).hexdigest()[:12]


def run_numbers(cfg: Config) -> dict[str, float]:
    """Parameters (gptjax's counts), training tokens and FLOPs (gptjax's FLOPs per token)."""
    counts = flops.param_counts(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.seq_len
    return {
        "params": counts["params"],
        "non_embedding_params": counts["non_embedding_params"],
        "tokens": tokens,
        "steps": cfg.train.steps,
        "flops": flops.flops_per_token(cfg.model) * tokens,
    }


def _is_execution_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in EXECUTION_KEYS)


def run_name(cfg: Config) -> str:
    """10 hex digits of the hash of what the run computes: its settings that differ from
    gptjax's defaults, EXECUTION_KEYS left out. (A key gptjax adds later, with a default that
    keeps today's behaviour, leaves every name as it was.)"""
    defaults = config_module.flatten(Config().to_dict())
    identity = {
        key: value
        for key, value in config_module.flatten(cfg.to_dict()).items()
        if not _is_execution_key(key) and (key not in defaults or defaults[key] != value)
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _apply(raw: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """`raw` (a full config dict) with dotted-key overrides, validated."""
    tree = OmegaConf.create(raw)
    try:
        for key, value in overrides.items():
            OmegaConf.update(tree, key, value, merge=False, force_add=True)
        merged = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad override: {str(error).splitlines()[0]}") from None
    return config_module.from_dict(merged)


def _label(choices: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    return " ".join(f"{key}={show(value)}" for key, value in choices.items())


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes, flattened to dotted-key overrides."""
    axes = []
    for axis, values in grid.items():
        if "." in axis:
            axes.append([{axis: value} for value in values])
            continue
        for value in values:
            if not isinstance(value, dict) or not value:
                raise ValueError(
                    f"grid axis '{axis}': without a dot its values must be mappings of dotted "
                    f"keys (e.g. {{model.d_model: 64, model.n_head: 2}}), got {value!r}"
                )
        axes.append(list(values))
    points = []
    for combination in itertools.product(*axes):
        point: dict[str, Any] = {}
        for part in combination:
            point.update(part)
        points.append(point)
    return points


def _base_path(base: str, spec_path: Path) -> Path:
    for candidate in (Path(base), spec_path.parent / base):
        if candidate.is_file():
            return candidate
    raise SweepError(f"{spec_path}: base config {base} not found (nor next to the spec)")


def _resolve(spec: Spec, base: dict[str, Any], choices: dict[str, Any]) -> Config:
    cfg = _apply(base, {**spec.overrides, **choices})
    extra: dict[str, Any] = {}
    if spec.lr_rule is not None:
        rule = spec.lr_rule
        extra["optim.lr"] = rule.lr * (rule.d_model / cfg.model.d_model) ** rule.power
    if spec.warmup_fraction is not None:
        extra["optim.warmup_steps"] = int(round(spec.warmup_fraction * cfg.train.steps))
    return _apply(cfg.to_dict(), extra) if extra else cfg


def _isoflop_points(spec: Spec, base: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
    iso = spec.isoflop
    points = []
    for budget in iso.budgets:
        needed = []
        for shape in iso.shapes:
            cfg = _resolve(spec, base, shape)
            per_step = flops.flops_per_token(cfg.model) * cfg.train.batch_size * cfg.model.seq_len
            steps = int(round(budget / per_step))
            needed.append(iso.min_steps * per_step)
            if steps >= iso.min_steps:
                points.append(({**shape, "train.steps": steps}, budget))
        if not any(b == budget for _, b in points):
            raise ValueError(
                f"isoflop budget {budget:.3g} FLOPs is too small for every shape: the smallest "
                f"needs {min(needed):.3g} FLOPs for isoflop.min_steps={iso.min_steps} steps"
            )
    return points


def load(path: str | Path) -> Sweep:
    """Read and check a spec, and resolve every run; any mistake is one SweepError line."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SweepError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must hold a mapping (base, grid or isoflop, ...)")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as error:
        raise SweepError(f"{path}: {config_module.explain(error, Spec, 'spec')}") from None
    directory = Path(spec.dir or Path("runs", "sweeps", path.stem))
    try:
        base = config_module.load(_base_path(spec.base, path)).to_dict()
        if spec.grid is not None:
            points = [(choices, None) for choices in _grid_points(spec.grid)]
        else:
            points = _isoflop_points(spec, base)
        runs, seen = [], {}
        for index, (choices, budget) in enumerate(points):
            cfg = _resolve(spec, base, choices)
            name = run_name(cfg)
            label = _label(({"budget": budget} if budget else {}) | choices)
            if name in seen:
                raise ValueError(f"runs {seen[name]} and {index} ({label}) are the same run")
            seen[name] = index
            cfg = _apply(cfg.to_dict(), {"run_dir": str(directory / name)})
            runs.append(Run(index, name, label, cfg, budget))
    except (ConfigError, ValueError) as error:
        message = str(error)
        raise SweepError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
    return Sweep(path, spec, directory, tuple(runs))


def execution_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` words for `sweep run`: only EXECUTION_KEYS (they leave the runs' names)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"{item!r} must look like key=value (e.g. train.stop_at=100)")
        if not _is_execution_key(key):
            raise SweepError(
                f"{key} changes what a run computes; set it in the spec (overrides or grid) "
                "so the runs get new names"
            )
        out[key] = yaml.safe_load(value) if value else value
    return out
