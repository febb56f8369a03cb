"""Preference pairs: `data.source=prefs:PATH`, the data of `train.objective=dpo | reward`.

PATH is a `.jsonl` file (or a directory of them, read in sorted order), one pair per line:

    {"messages": [...the conversation so far...], "chosen": "...", "rejected": "..."}

`messages` is checked as a chat conversation (gptjax/data/chat.py) and must end with a user
message; `chosen` and `rejected` are two different replies (strings) of the assistant's next
turn. Other keys are ignored. A malformed line is one DataError `PATH:LINE: why`, raised when the
source is opened, before anything is written.

Each reply is rendered as a row of its own: the conversation, `<|assistant|>`, the reply,
`<|end|>`, with the loss mask on the reply's tokens and its `<|end|>` only (the tokens whose
log-probability makes the reply's score). A row is one sequence (segment 1, positions from 0),
padded on the right with the end-of-document token (mask 0); a pair longer than the window loses
the start of its conversation, then (if still too long) the end of its reply.

Layout: global row 2i is pair i's chosen reply and row 2i+1 its rejected reply, so both replies
of a pair are always in the same batch (`train.batch_size` counts rows and must be even), and on
the same device whenever each device holds an even number of rows. Rows are drawn as pairs:
pair j of the run is pair perm_e(j mod N) of epoch e = j div N (a seeded NumPy permutation of the
N training pairs), so a batch is a pure function of (seed, step), as for packed windows.

Held out: a pair goes to the validation split when the SHA-256 of its line's canonical JSON falls
in the first `data.val_fraction` of the hash range (at least one pair is held out), so the split
of a pair never changes when lines are appended (serve's feedback file grows).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gptjax.data.chat as chat
import gptjax.data.tokenizer as tok
from gptjax import atomic
from gptjax.config import DataConfig
from gptjax.data.corpus import DataError

KINDS = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    messages: list
    chosen: str
    rejected: str
    where: str  # path:line


def files(argument: str) -> list[Path]:
    path = Path(argument).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not found:
            raise DataError(f"{path}: no .jsonl files")
        return found
    raise DataError(f"preference pairs not found: {path}")


def parse_line(line: str, where: str) -> Pair:
    """One JSONL line as a Pair; a DataError naming `where` otherwise."""
    record, messages = chat.parse_record(line, where)
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's (the replies answer it)")
    for kind in KINDS:
        if not isinstance(record.get(kind), str):
            raise DataError(f"{where}: no string '{kind}' reply")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply")
    return Pair(messages, record["chosen"], record["rejected"], where)


def read(argument: str) -> list[Pair]:
    pairs = []
    for path in files(argument):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 (byte {error.start})") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                pairs.append(parse_line(line, f"{path}:{number}"))
    if not pairs:
        raise DataError(f"{argument}: no preference pairs")
    return pairs


def _key(pair: Pair) -> float:
    """Where the pair falls in [0, 1): the hash of its content."""
    text = json.dumps([pair.messages, pair.chosen, pair.rejected], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split(pairs: list[Pair], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) by content hash; at least one pair on each side when there are 2+."""
    keys = [_key(p) for p in pairs]
    val = [p for p, k in zip(pairs, keys, strict=True) if k < val_fraction]
    train = [p for p, k in zip(pairs, keys, strict=True) if k >= val_fraction]
    if not val:  # hold out the pair with the smallest hash
        first = int(np.argmin(keys))
        val, train = [pairs[first]], pairs[:first] + pairs[first + 1 :]
    if not train:
        raise DataError(
            f"{pairs[0].where.rpartition(':')[0]}: {len(pairs)} preference pair(s), all held out; "
            "add pairs or lower data.val_fraction"
        )
    return train, val


def render(
    template: chat.Template, pairs: list[Pair], seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [N, 2, T + 1] int32, loss masks [N, 2, T + 1] uint8, reply lengths [N, 2]):
    each pair's chosen (0) and rejected (1) rows, laid out as the module docstring says."""
    window = seq_len + 1
    eod = template.tokenizer.eod_id
    prompts = [template.prompt(p.messages) for p in pairs]
    replies = template.tokenizer.encode_batch([r for p in pairs for r in (p.chosen, p.rejected)])
    tokens = np.full((len(pairs), 2, window), eod, np.int32)
    masks = np.zeros((len(pairs), 2, window), np.uint8)
    lengths = np.zeros((len(pairs), 2), np.int32)
    for i, prompt in enumerate(prompts):
        for k in range(2):
            reply = list(replies[2 * i + k]) + template.end
            reply = reply[: window - 1]  # at least one prompt token stays as context
            kept = prompt[len(prompt) - min(len(prompt), window - len(reply)) :]
            row = kept + reply
            tokens[i, k, : len(row)] = row
            masks[i, k, len(kept) : len(row)] = 1
            lengths[i, k] = len(reply)
    return tokens, masks, lengths


class Rows:
    """A split's rows: `len` counts rows (2 per pair), as packed windows count windows."""

    def __init__(self, tokens: np.ndarray, masks: np.ndarray):
        self.tokens, self.masks = tokens, masks

    def __len__(self) -> int:
        return 2 * len(self.tokens)

    @property
    def pairs(self) -> int:
        return len(self.tokens)


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**32, epoch]).permutation(n)


@dataclass(eq=False)
class PairData:
    """Preference pairs as batches: the interface of pipeline.Dataset (train_batch, val_batch,
    tokenizer, token_bytes) with rows 2i / 2i+1 the chosen / rejected reply of a pair."""

    tokenizer: tok.TextTokenizer
    train: Rows
    val: Rows
    token_bytes: np.ndarray
    directory: Path
    meta: dict = field(default_factory=dict)

    def pair_ids(self, seed: int, pairs: np.ndarray) -> np.ndarray:
        n = self.train.pairs
        epochs, offsets = np.divmod(np.asarray(pairs, np.int64), n)
        return np.array(
            [_permutation(seed, int(e), n)[o] for e, o in zip(epochs, offsets, strict=True)],
            np.int64,
        )

    def _batch(self, rows: Rows, first_pair: int, start: int, stop: int, ids) -> dict:
        r = np.arange(start, stop)
        pair, kind = ids(first_pair + r // 2), r % 2
        return from_rows(rows.tokens[pair, kind], rows.masks[pair, kind])

    def train_batch(self, seed: int, step: int, batch_size: int, start: int, stop: int) -> dict:
        """Rows [start, stop) of the global batch of `step` (B rows: B/2 pairs)."""
        ids = lambda j: self.pair_ids(seed, j)
        return self._batch(self.train, step * (batch_size // 2), start, stop, ids)

    def val_batch(self, eval_step: int, batch_size: int, start: int, stop: int) -> dict:
        """The fixed validation batch `eval_step`: the held-out pairs in order (cycling)."""
        ids = lambda j: j % self.val.pairs
        return self._batch(self.val, eval_step * (batch_size // 2), start, stop, ids)


def from_rows(tokens: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """A batch dict (gptjax/data/batching.py) of rows [n, T + 1]: one sequence per row."""
    n, window = tokens.shape
    positions = np.broadcast_to(np.arange(window - 1, dtype=np.int32), (n, window - 1))
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "loss_mask": masks[:, 1:].astype(np.int32),
        "segment_ids": np.ones((n, window - 1), np.int32),
        "positions": np.ascontiguousarray(positions),
    }


def load(cfg: DataConfig, argument: str, seq_len: int, tokenizer_path, max_vocab) -> PairData:
    """The pairs of `prefs:ARGUMENT` rendered with the run's tokenizer (`tokenizer_path`: the
    init_from run's, else data.tokenizer); nothing is cached: rendering is one pass in memory."""
    pairs = read(argument)
    given = tokenizer_path or cfg.tokenizer
    if given is None:
        raise DataError(
            f"data.source={cfg.source}: preference pairs need a tokenizer: set train.init_from "
            "(the fine-tuned run) or data.tokenizer"
        )
    tokenizer = tok.load(given)
    if max_vocab is not None and tokenizer.vocab_size > max_vocab:
        raise DataError(
            f"{given} has {tokenizer.vocab_size} pieces but model.vocab_size={max_vocab}; "
            f"raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    train, val = split(pairs, cfg.val_fraction)
    template = chat.Template(tokenizer)
    (tt, tm, tl), (vt, vm, vl) = render(template, train, seq_len), render(template, val, seq_len)
    meta = {
        "source": cfg.source,
        "pairs": {"train": len(train), "validation": len(val)},
        "cut_replies": int((tl >= seq_len).sum() + (vl >= seq_len).sum()),
    }
    return PairData(
        tokenizer, Rows(tt, tm), Rows(vt, vm), tokenizer.token_bytes(), Path(argument), meta
    )


# --- pairs from conversations (`gptjax prefs build`) --------------------------------------------


def conversations_of(source: str) -> list[list[dict]]:
    """The conversations of a conversation source (`chitchat`, `chat:PATH`), in its order."""
    from gptjax.data.sources import parse

    entry, argument = parse(source)
    if not entry.conversations or entry.pairs:
        raise DataError(f"{source}: not a conversation source; use chitchat or chat:PATH")
    return [chat.from_json(text) for _, text in entry.load().documents(argument)()]


def from_conversations(
    conversations: list[list[dict]], seed: int = 0, history: int = 3, max_pairs: int | None = None
) -> list[dict]:
    """Offline pairs, one per conversation with an assistant turn that answers a user: the turn
    is drawn at random (seeded); `messages` are the (at most `history`) messages before it,
    starting at a user message (a system message first is kept); `chosen` is the real reply,
    `rejected` an assistant reply drawn from another conversation. Pairs whose two replies are
    equal, or empty, are skipped."""
    rng = np.random.default_rng(seed)
    replies = [
        (c, m["content"])
        for c, messages in enumerate(conversations)
        for m in messages
        if m["role"] == "assistant" and m["content"].strip()
    ]
    if len({c for c, _ in replies}) < 2:
        raise DataError("pairs need assistant replies in at least two conversations")
    out = []
    for c, messages in enumerate(conversations):
        turns = [
            i
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user"
        ]
        if not turns:
            continue
        turn = turns[int(rng.integers(len(turns)))]
        system = messages[:1] if messages[0]["role"] == "system" else []
        before = messages[len(system) : turn][-history:]
        while before and before[0]["role"] != "user":
            before = before[1:]
        while True:  # a reply of another conversation
            other, rejected = replies[int(rng.integers(len(replies)))]
            if other != c:
                break
        chosen = messages[turn]["content"]
        if not chosen.strip() or chosen == rejected:
            continue
        out.append({"messages": system + before, "chosen": chosen, "rejected": rejected})
        if max_pairs is not None and len(out) >= max_pairs:
            break
    return out


def write(path: str | Path, pairs: list[dict]) -> Path:
    """The pairs as JSONL (the format `read` checks), written atomically."""
    path = Path(path)
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    atomic.write_file(path, text)
    return path
