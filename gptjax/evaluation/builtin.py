"""Built-in tasks that need no download, cut from the embedded corpus (the running Python's
standard library, data.source=stdlib) by the same name hash that holds files out of training
(data.val_fraction, 0.05 by default): a model trained on the stdlib never saw their examples.

- `stdlib_next_line` (multiple choice, 4 choices, chance 25%): the lines before a line of a
  held-out file (at most CONTEXT_LINES lines, CONTEXT_CHARS characters) and four candidates for
  the next line, the true one and three lines of other held-out files.
- `stdlib_names` (cloze, as LAMBADA): a line of a held-out file up to its last name, where that
  name already appeared in the lines before it; the target is the name (greedy exact match).

Few-shot examples come from files that training does use. The examples are a pure function of
(the standard library's files, val_fraction, seed); their count is capped at MAX_EXAMPLES.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gptjax.data import corpus
from gptjax.evaluation.tasks import Example, Settings, Task, TaskError, read_task

CONTEXT_LINES = 12
CONTEXT_CHARS = 400
MAX_EXAMPLES = 500
POOL = 64
PER_FILE = 20
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}$")


def _files(val_fraction: float, held_out: bool) -> list[tuple[str, list[str]]]:
    """(name, lines) of the stdlib files on one side of the split, sorted by name."""
    return sorted(
        (name, text.splitlines())
        for name, text in corpus.iter_stdlib()
        if corpus.is_validation(name, val_fraction) == held_out
    )


def _candidate(line: str) -> bool:
    return 12 <= len(line.strip()) <= 80 and not line.strip().startswith("#")


def _context(lines: list[str], i: int) -> str:
    """The lines before line i (at most CONTEXT_LINES, CONTEXT_CHARS), each ending in \\n."""
    picked: list[str] = []
    for line in reversed(lines[max(0, i - CONTEXT_LINES) : i]):
        if sum(len(p) + 1 for p in picked) + len(line) + 1 > CONTEXT_CHARS:
            break
        picked.insert(0, line)
    return "".join(p + "\n" for p in picked)


def _next_line(files, rng, limit: int) -> list[Example]:
    spots = [
        (f, i)
        for f, (_, lines) in enumerate(files)
        for i in range(3, len(lines))
        if _candidate(lines[i]) and lines[i - 1].strip()
    ]
    rng.shuffle(spots)
    examples, per_file = [], [0] * len(files)
    for f, i in spots:
        if len(examples) == limit:
            break
        if per_file[f] == PER_FILE:
            continue
        lines = files[f][1]
        true, others = lines[i], []
        while len(others) < 3:  # distractors: candidate lines of other files
            g, j = spots[rng.integers(len(spots))]
            line = files[g][1][j]
            if g != f and line.strip() != true.strip() and line not in others:
                others.append(line)
        label = int(rng.integers(4))
        choices = others[:label] + [true] + others[label:]
        examples.append(Example(_context(lines, i), tuple(choices), label))
        per_file[f] += 1
    return examples


def _names(files, rng, limit: int) -> list[Example]:
    found = []
    for _, lines in files:
        for i in range(1, len(lines)):
            match = NAME.search(lines[i].rstrip())
            if not match or not _candidate(lines[i]):
                continue
            head = lines[i].rstrip()[: match.start()]
            before = _context(lines, i)
            if head.strip() and re.search(rf"\b{match.group()}\b", before):
                found.append(Example(before + head, target=match.group()))
    order = rng.permutation(len(found))[:limit]
    return [found[k] for k in sorted(order)]


def _build(make, seed: int, val_fraction: float, limit: int) -> tuple[list, list]:
    held_out = make(_files(val_fraction, True), np.random.default_rng([seed, 0]), limit)
    pool = make(_files(val_fraction, False)[:40], np.random.default_rng([seed, 1]), POOL)
    return held_out, pool


def stdlib_next_line(seed: int = 0, val_fraction: float = 0.05) -> Task:
    examples, pool = _build(_next_line, seed, val_fraction, MAX_EXAMPLES)
    settings = Settings(target_delimiter="", fewshot_delimiter="\n")
    return Task("stdlib_next_line", "choice", examples, pool, settings)


def stdlib_names(seed: int = 0, val_fraction: float = 0.05) -> Task:
    examples, pool = _build(_names, seed, val_fraction, MAX_EXAMPLES)
    settings = Settings(target_delimiter="", fewshot_delimiter="\n")
    return Task("stdlib_names", "cloze", examples, pool, settings)


TASKS: dict[str, Callable[..., Task]] = {
    "stdlib_next_line": stdlib_next_line,
    "stdlib_names": stdlib_names,
}


def resolve(name: str, **builtin_options) -> Task:
    """A built-in task by name, or a task file or directory by path."""
    if name in TASKS:
        return TASKS[name](**builtin_options)
    if "/" in name or name.endswith(".jsonl") or Path(name).exists():
        return read_task(name)
    raise TaskError(
        f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}; "
        "or give a .jsonl file or a task directory"
    )
