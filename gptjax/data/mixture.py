"""Weighted mixtures of sources (`data.mixture`, `data.phases`), as GPT-3 trained.

Each source is prepared and cached on its own (pipeline.prepare with the mixture's one
tokenizer), so adding or reweighting a source never retokenizes the others. Rows of the global
row stream (position p = s·B + r of step s, row r) are assigned to sources by a schedule that
meets the weights exactly over every block of rows:

- a phase's weights w_i become whole rows per block: the block is the smallest K for which every
  share w_i / sum(w) times K is an integer, reading the weights as the decimals written (0.6 is
  3/5; GPT-3's 60/22/8/8/3 gives K = 101); weights that need K > MAX_BLOCK are rounded to
  MAX_BLOCK rows by largest remainders (the plan table shows the shares kept);
- block b of a phase is its K sources in a seeded random order (seed, the phase's first step, b);
- the j-th row a source gets (counted over the whole run, across phases) is window
  shuffle_e(j mod N) of that source's N windows in epoch e = j div N, its own seeded bijection
  (grain's index_shuffle, pipeline.Dataset.window_ids): a small source repeats, epochs differ.

So the batch of step s is a pure function of (seed, s): any mesh, any process count. A phase
starting at step k changes nothing before step k (the rows before it never look at it), and a
resumed run with a phase added continues deterministically.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

import gptjax.data.batching as batching
import gptjax.data.pipeline as pipeline
from gptjax.config import DataConfig
from gptjax.data.corpus import DataError

MAX_BLOCK = 10_000


def default_name(source: str) -> str:
    """A short name for a source (eval_loss/NAME): its path's last plain part, else its name."""
    kind, _, argument = source.partition(":")
    parts = [p for p in re.split(r"[/\\:]", argument) if p and not set("*?[") & set(p)]
    name = parts[-1].split(".")[0] if parts else kind
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or kind


@dataclass(frozen=True)
class Entry:
    name: str
    source: str


def entries(cfg: DataConfig) -> list[Entry]:
    """Every source of the mixture and its phases, in order of first appearance; a name means
    one source throughout."""
    seen: dict[str, Entry] = {}
    for where, mixture in _mixtures(cfg):
        names = set()
        for item in mixture:
            entry = Entry(item.name or default_name(item.source), item.source)
            if entry.name in names:
                raise DataError(
                    f"{where}: two sources are named {entry.name!r}; give each a `name`"
                )
            names.add(entry.name)
            if seen.setdefault(entry.name, entry) != entry:
                raise DataError(
                    f"{where}: the name {entry.name!r} is {seen[entry.name].source} elsewhere, "
                    f"{entry.source} here; give them different names"
                )
    return list(seen.values())


def _mixtures(cfg: DataConfig):
    yield "data.mixture", cfg.mixture
    for i, phase in enumerate(cfg.phases or []):
        yield f"data.phases[{i}].mixture", phase.mixture


def block_counts(weights: list[float]) -> tuple[int, ...]:
    """Rows of each source per block: exact shares of the weights (as written), or MAX_BLOCK
    rows by largest remainders."""
    fractions = [Fraction(str(w)) for w in weights]
    total = sum(fractions)
    if not total > 0:
        raise DataError(f"mixture weights {weights} do not sum to a positive number")
    shares = [f / total for f in fractions]
    block = math.lcm(*(s.denominator for s in shares))
    if block <= MAX_BLOCK:
        return tuple(int(s * block) for s in shares)
    quotas = [s * MAX_BLOCK for s in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: MAX_BLOCK - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


@dataclass(frozen=True)
class Phase:
    start_step: int
    counts: tuple[int, ...]  # rows per block of each entry (0: not in this phase)

    @property
    def block(self) -> int:
        return sum(self.counts)


def phases(cfg: DataConfig, names: list[str]) -> list[Phase]:
    """The phases of the run: the mixture from step 0, then each of data.phases."""
    out = []
    starts = [0] + [p.at for p in cfg.phases or []]
    for start, (_, mixture) in zip(starts, _mixtures(cfg), strict=True):
        weights = {item.name or default_name(item.source): item.weight for item in mixture}
        present = [n for n in names if n in weights]
        counts = dict(zip(present, block_counts([weights[n] for n in present]), strict=True))
        out.append(Phase(start, tuple(counts.get(n, 0) for n in names)))
    return out


class Schedule:
    """Which source, and which of its rows, each position of the global row stream is."""

    def __init__(self, phases: list[Phase], batch_size: int, seed: int):
        self.phases = phases
        self.starts = [p.start_step * batch_size for p in phases]  # first position of each
        self.seed = seed
        self.before = [np.zeros(len(phases[0].counts), np.int64)]  # rows per source at each start
        for j in range(1, len(phases)):
            self.before.append(self.before[-1] + self._rows_in(j - 1, self.starts[j]))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one schedule per run, a few blocks a step
    def _block(self, j: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each row, its rank among that source's rows) in block b of phase j."""
        counts = self.phases[j].counts
        order = np.repeat(np.arange(len(counts)), counts)
        rng = np.random.default_rng([self.seed % 2**32, self.phases[j].start_step, b])
        order = rng.permutation(order)
        ranks = np.empty(len(order), np.int64)
        for i, count in enumerate(counts):
            ranks[order == i] = np.arange(count)
        return order, ranks

    def _rows_in(self, j: int, end: int) -> np.ndarray:
        """Rows of each source among phase j's positions before `end`."""
        full, rest = divmod(end - self.starts[j], self.phases[j].block)
        counts = np.array(self.phases[j].counts, np.int64) * full
        order, _ = self._block(j, full)
        return counts + np.bincount(order[:rest], minlength=len(counts))

    def rows_before(self, position: int) -> np.ndarray:
        """Rows each source has given to positions [0, position): int64 [sources]."""
        j = bisect.bisect_right(self.starts, position) - 1
        return self.before[j] + self._rows_in(j, position)

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row of that source counted over the run) of each position."""
        sources = np.empty(len(positions), np.int64)
        rows = np.empty(len(positions), np.int64)
        for n, p in enumerate(positions):
            j = bisect.bisect_right(self.starts, int(p)) - 1
            b, o = divmod(int(p) - self.starts[j], self.phases[j].block)
            order, ranks = self._block(j, b)
            i = order[o]
            sources[n] = i
            rows[n] = self.before[j][i] + b * self.phases[j].counts[i] + ranks[o]
        return sources, rows


def source_seed(seed: int, name: str) -> int:
    """The seed of a source's own epoch shuffles: its name's, not its place in the list."""
    return int(
        np.random.SeedSequence([seed % 2**32, zlib.crc32(name.encode())]).generate_state(1)[0]
    )


@dataclass(eq=False)
class Part:
    name: str
    source: str
    data: object  # its pipeline.Dataset


class Mixture:
    """Several prepared sources behind the interface of pipeline.Dataset (train_batch,
    tokenizer, token_bytes); `parts` are the sources, `weights` the first phase's shares (the
    mixed evaluation figures weigh the sources by them)."""

    def __init__(self, parts: list[Part], phase_list: list[Phase], packing: str):
        self.parts = parts
        self.phases = phase_list
        self.packing = packing
        first = parts[0].data
        self.tokenizer = first.tokenizer
        self.token_bytes = first.token_bytes
        self.directory = first.directory.parent
        block = phase_list[0].block
        self.weights = {p.name: c / block for p, c in zip(parts, phase_list[0].counts, strict=True)}
        self.meta = {"mixture": [{"name": p.name, **p.data.meta} for p in parts]}

    @functools.lru_cache(maxsize=4)  # noqa: B019 - (seed, batch size) of the run
    def schedule(self, seed: int, batch_size: int) -> Schedule:
        return Schedule(self.phases, batch_size, seed)

    def train_indices(self, seed: int, step: int, batch_size: int, start: int, stop: int):
        """(source index, window id in that source) of rows [start, stop) of step's batch."""
        positions = step * batch_size + np.arange(start, stop, dtype=np.int64)
        sources, rows = self.schedule(seed, batch_size).assign(positions)
        windows = np.empty_like(rows)
        for i, part in enumerate(self.parts):
            mine = sources == i
            if mine.any():
                windows[mine] = part.data.window_ids(source_seed(seed, part.name), rows[mine])
        return sources, windows

    def train_batch(self, seed: int, step: int, batch_size: int, start: int, stop: int) -> dict:
        sources, windows = self.train_indices(seed, step, batch_size, start, stop)
        rows = None
        masks = None
        for i, part in enumerate(self.parts):
            mine = np.flatnonzero(sources == i)
            if not len(mine):
                continue
            got = part.data.train.read(windows[mine])
            if rows is None:
                rows = np.empty((stop - start, got.shape[1]), got.dtype)
            rows[mine] = got
            if part.data.train_mask is not None:
                if masks is None:
                    masks = np.empty_like(rows, np.uint8)
                masks[mine] = part.data.train_mask.read(windows[mine])
        return batching.from_windows(rows, self.tokenizer.eod_id, self.packing, masks)

    def table(self, seed: int, steps: int, batch_size: int) -> list[dict]:
        """GPT-3's table 2.2 for this mixture: each source's documents, tokens, weight per phase
        and the epochs it sees in `steps` steps (its rows over its windows)."""
        rows = self.schedule(seed, batch_size).rows_before(steps * batch_size)
        out = []
        for i, part in enumerate(self.parts):
            train = part.data.meta["train"]
            weights = [p.counts[i] / p.block for p in self.phases]
            out.append(
                {
                    "name": part.name,
                    "source": part.source,
                    "documents": train["documents"],
                    "tokens": train["tokens"],
                    "weights": weights,
                    "rows": int(rows[i]),
                    "epochs": int(rows[i]) / max(len(part.data.train), 1),
                }
            )
        return out


def format_table(rows: list[dict], phases: list[Phase], steps: int, tokens_per_step: int) -> str:
    """The plan table as text: one line per source."""
    heads = [f"weight@{p.start_step}" if p.start_step else "weight" for p in phases]
    header = ["source", "documents", "tokens", *heads, "epochs"]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["name"],
                f"{row['documents']:,}",
                f"{row['tokens']:,}",
                *(f"{w:.1%}" for w in row["weights"]),
                f"{row['epochs']:.3g}",
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    trained = steps * tokens_per_step
    return "\n".join([f"data mixture: epochs in train.steps={steps:,} ({trained:,} tokens)", *text])


def _source_configs(cfg: DataConfig) -> tuple[list[Entry], list[DataConfig]]:
    """The mixture's entries and a DataConfig of each alone, checked (known source, the packing
    conversations need, and one kind of document for the one tokenizer) before anything is read
    or written."""
    from gptjax.data.sources import check, parse

    found = entries(cfg)
    configs = [
        cfg.model_copy(update={"source": e.source, "mixture": None, "phases": None}) for e in found
    ]
    for entry, part in zip(found, configs, strict=True):
        try:
            check(part)
        except DataError as error:
            raise DataError(f"data.mixture source {entry.name!r}: {error}") from None
    chat = [e.name for e in found if parse(e.source)[0].conversations]
    if chat and len(chat) < len(found):
        plain = [e.name for e in found if e.name not in chat]
        raise DataError(
            f"data.mixture mixes conversations ({', '.join(chat)}) with plain text "
            f"({', '.join(plain)}): they cannot share one chat template and loss mask; "
            "mix sources of one kind"
        )
    return found, configs


def prepare(
    cfg: DataConfig,
    seq_len: int,
    tokenizer_path=None,
    max_vocab: int | None = None,
    progress: bool = False,
) -> list:
    """Every source of the mixture prepared on its own with one tokenizer (given, else trained
    on a sample of the first phase's sources in proportion to their weights); returns their
    directories. Every source's documents are opened (paths checked) before any is written."""
    import gptjax.data.array_records as array_records

    found, configs = _source_configs(cfg)
    root = pipeline.cache_root(cfg)
    documents = [array_records.open_documents(c, root, progress) for c in configs]
    weights = {item.name or default_name(item.source): item.weight for item in cfg.mixture}
    chat = [pipeline._is_chat(c.source) for c in configs]
    weighted = [
        (d, weights[e.name], talk)
        for e, d, talk in zip(found, documents, chat, strict=True)
        if e.name in weights
    ]
    given = tokenizer_path or cfg.tokenizer
    tokenizer = pipeline.tokenizer_for(cfg, given, max_vocab, weighted, root, progress)
    return [
        pipeline.pack(c, seq_len, d, tokenizer, root, progress)
        for c, d in zip(configs, documents, strict=True)
    ]


def load(cfg: DataConfig, seq_len: int, tokenizer_path=None, max_vocab=None, progress=False):
    """The Mixture of `cfg.mixture` (prepared first where not cached; several processes sharing
    a cache prepare it once)."""
    import gptjax.data.sharing as sharing

    found, _ = _source_configs(cfg)  # in every process, before any of them prepares
    directories = sharing.prepare_once(
        pipeline.cache_root(cfg),
        lambda: prepare(cfg, seq_len, tokenizer_path, max_vocab, progress),
    )
    parts = [
        Part(e.name, e.source, pipeline.open_prepared(d, seq_len, cfg.packing))
        for e, d in zip(found, directories, strict=True)
    ]
    return Mixture(parts, phases(cfg, [e.name for e in found]), cfg.packing)


def load_dataset(
    cfg: DataConfig, seq_len: int, tokenizer_path=None, max_vocab=None, progress=False
):
    """The data of `cfg`: a Mixture for data.mixture, preference pairs (prefs.PairData) for
    `prefs:PATH`, else pipeline.load_dataset's Dataset."""
    if cfg.mixture is None and cfg.source.partition(":")[0] == "prefs":
        import gptjax.data.prefs as prefs
        from gptjax.data.sources import check

        check(cfg)
        argument = cfg.source.partition(":")[2]
        return prefs.load(cfg, argument, seq_len, tokenizer_path, max_vocab)
    if cfg.mixture is not None:
        return load(cfg, seq_len, tokenizer_path, max_vocab, progress)
    return pipeline.load_dataset(cfg, seq_len, tokenizer_path, max_vocab, progress)
