"""Tasks: examples read from JSONL files (or built in), and the prompts few-shot scoring sends.

A task file holds one JSON object per line, of one of two kinds:
  multiple choice  {"context": str, "choices": [str, ...], "label": int}
  cloze            {"context": str, "target": str}
A task is a `.jsonl` file (its examples; few-shot examples come from the other examples of the
same file) or a directory holding `test.jsonl` (or `validation.jsonl`), optionally `train.jsonl`
(the few-shot pool) and `task.json` (settings: the fields of `Settings`). Built-in tasks
(gptjax/evaluation/builtin.py, which also resolves a name to a task) need no file.

The prompt of example e with K shots (lm-eval's layout):
  description + shot_1 + fewshot_delimiter + ... + shot_K + fewshot_delimiter + e.context
where shot = context + target_delimiter + its answer, and each continuation scored is
target_delimiter + choice (or + target). The K shots of example i are drawn without replacement
from the pool (the example itself excluded) by numpy's generator seeded with (seed, i): the
same prompt whatever else is evaluated, and whatever the --limit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from gptjax.errors import UserError


class TaskError(UserError):
    """An unknown task, a malformed task file (with its line number) or impossible settings."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice
    label: int = -1
    target: str = ""  # cloze

    @property
    def answer(self) -> str:
        return self.choices[self.label] if self.choices else self.target


@dataclass(frozen=True)
class Settings:
    """A task's template (task.json)."""

    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    unconditional_context: str = "Answer:"  # GPT-3's unconditional normalisation


@dataclass
class Task:
    name: str
    kind: Literal["choice", "cloze"]
    examples: list[Example]
    pool: list[Example] | None = None  # few-shot examples; None: the other examples
    settings: Settings = field(default_factory=Settings)

    def prompt(self, index: int, shots: int, seed: int) -> str:
        """The context sent for examples[index] with `shots` examples before it."""
        s, example = self.settings, self.examples[index]
        if not shots:
            return s.description + example.context
        pool = self.pool if self.pool is not None else self.examples
        candidates = np.arange(len(pool))
        if self.pool is None:
            candidates = candidates[candidates != index]
        if shots > len(candidates):
            raise TaskError(
                f"task {self.name}: {shots} shots but only {len(candidates)} examples to draw "
                "them from; use fewer --shots or add a train.jsonl"
            )
        rng = np.random.default_rng([seed, index])
        drawn = rng.choice(candidates, size=shots, replace=False)
        parts = [pool[j].context + s.target_delimiter + pool[j].answer for j in drawn]
        return s.description + s.fewshot_delimiter.join([*parts, example.context])


def _example(path: Path, number: int, line: str) -> Example:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise TaskError(f"{where}: not valid JSON") from None
    if not isinstance(row, dict) or not isinstance(row.get("context"), str):
        raise TaskError(f'{where}: needs a "context" string')
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or not choices:
            raise TaskError(f'{where}: "choices" must be a non-empty list of strings')
        if any(not isinstance(c, str) or not c for c in choices):
            raise TaskError(f"{where}: every choice must be a non-empty string")
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            raise TaskError(f'{where}: needs an integer "label" (the index of the right choice)')
        if not 0 <= label < len(choices):
            raise TaskError(f"{where}: label {label} is not an index of its {len(choices)} choices")
        return Example(row["context"], tuple(choices), label)
    if "target" in row:
        if not isinstance(row["target"], str) or not row["target"]:
            raise TaskError(f'{where}: "target" must be a non-empty string')
        return Example(row["context"], target=row["target"])
    raise TaskError(f'{where}: needs "choices" and "label" (multiple choice) or "target" (cloze)')


def read_examples(path: Path) -> list[Example]:
    """The examples of one JSONL file; any malformed line is a TaskError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TaskError(f"{path}: {getattr(error, 'strerror', None) or 'not UTF-8'}") from None
    examples = [_example(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise TaskError(f"{path} holds no examples")
    kinds = {bool(e.choices) for e in examples}
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes multiple-choice and cloze examples; use one kind a file")
    return examples


def _kind(examples: list[Example]) -> str:
    return "choice" if examples[0].choices else "cloze"


def read_settings(path: Path) -> Settings:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TaskError(f"{path}: not a readable JSON object ({type(error).__name__})") from None
    known = {f.name for f in dataclasses.fields(Settings)}
    if (
        not isinstance(raw, dict)
        or set(raw) - known
        or any(not isinstance(v, str) for v in raw.values())
    ):
        raise TaskError(f"{path}: use an object of strings with keys among {sorted(known)}")
    return Settings(**raw)


def read_task(path: str | Path) -> Task:
    """A task from a `.jsonl` file or a task directory (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        examples = read_examples(path)
        return Task(path.stem, _kind(examples), examples)
    if not path.is_dir():
        raise TaskError(f"task {path}: no such file or directory")
    split = next(
        (path / n for n in ("test.jsonl", "validation.jsonl") if (path / n).is_file()), None
    )
    if split is None:
        raise TaskError(f"task directory {path} holds no test.jsonl or validation.jsonl")
    examples = read_examples(split)
    pool = read_examples(path / "train.jsonl") if (path / "train.jsonl").is_file() else None
    if pool is not None and _kind(pool) != _kind(examples):
        raise TaskError(f"{path}: train.jsonl and {split.name} hold different kinds of examples")
    settings = read_settings(path / "task.json") if (path / "task.json").is_file() else Settings()
    return Task(path.name, _kind(examples), examples, pool, settings)
