"""SentencePiece BPE that round-trips text exactly (code included): no normalisation, whitespace
kept, digits split, unknown characters as UTF-8 bytes. Id 1 is the end-of-document token of the
tokenizers trained here; a given model uses its own `eos` id. Ids 2-5 are the chat template's
role markers (gptjax/data/chat.py), reserved as control pieces: never produced from text, so a
pretrained run can be fine-tuned into a chat model without a new vocabulary.

Every tokenizer gptjax uses has the interface of `TextTokenizer`; a directory (a run, the data
cache) holds one tokenizer file whose name says its kind: `tokenizer.model` (SentencePiece, this
module) or `tokenizer.json` (GPT-2 style byte-level BPE, gptjax/data/bpe.py). `find` and `load`
dispatch on that name."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from gptjax.data.corpus import DataError

EOD_ID = 1
ROLE_PIECES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # the chat template's
TRAINER_SETTINGS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=False,
    character_coverage=0.9995,
    user_defined_symbols=["\n"],
    control_symbols=list(ROLE_PIECES),
    unk_id=0,
    eos_id=EOD_ID,
    bos_id=-1,
    pad_id=-1,
    max_sentence_length=8192,
)


def _lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of `texts` (what SentencePiece trains on), at most `max_bytes` of them."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            seen += len(line.encode())
            if seen > max_bytes:
                return
            yield line


def train(texts: Iterable[str], vocab_size: int, max_bytes: int = 20_000_000) -> bytes:
    """Train a BPE model on (a capped sample of) `texts`; returns the serialised model."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, max_bytes),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **TRAINER_SETTINGS,
        )
    except RuntimeError as error:  # e.g. "Vocabulary size too high (8192). Please set it to..."
        reason = str(error).strip().splitlines()[-1].split("] ")[-1]
        raise DataError(
            f"training a {vocab_size}-piece tokenizer failed: {reason} (data.vocab_size)"
        ) from None
    return model.getvalue()


class TextTokenizer(Protocol):
    """What gptjax needs of a tokenizer (data packing, sampling, bits per byte, run dirs)."""

    filename: str  # the file it is saved as in a directory
    model_bytes: bytes  # that file's contents (the data cache keys on them)

    @property
    def vocab_size(self) -> int: ...
    @property
    def eod_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self) -> np.ndarray: ...
    def save(self, path: str | Path) -> None: ...


def _kinds() -> dict[str, type]:
    from gptjax.data.bpe import BPETokenizer

    return {Tokenizer.filename: Tokenizer, BPETokenizer.filename: BPETokenizer}


def find(directory: str | Path) -> Path | None:
    """The tokenizer file saved in `directory` (tokenizer.model or tokenizer.json), or None."""
    for name in _kinds():
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def from_bytes(filename: str, model: bytes) -> TextTokenizer:
    """The tokenizer of a file's contents, by the file's name (tokenizer.model or .json)."""
    return _kinds()[filename](model)


def load(path: str | Path) -> TextTokenizer:
    """The tokenizer in a file (by its suffix: .json is BPE, else SentencePiece) or a directory."""
    path = Path(path)
    if path.is_dir():
        found = find(path)
        if found is None:
            raise DataError(f"no tokenizer ({' or '.join(_kinds())}) in {path}")
        path = found
    kind = _kinds()["tokenizer.json"] if path.suffix == ".json" else Tokenizer
    return kind.load(path)


class Tokenizer:
    """SentencePiece (the tokenizers gptjax trains)."""

    filename = "tokenizer.model"

    def __init__(self, model: bytes):
        self.model_bytes = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.threads = os.cpu_count() or 1  # encode_batch's threads (1 in a worker process)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a SentencePiece model file; a missing or invalid file is a DataError."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer not found: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise DataError(f"{path}: not a SentencePiece model") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_bytes)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """The end-of-document token (SentencePiece's `eos`)."""
        eos = self.sp.eos_id()
        if eos < 0:
            raise DataError("the tokenizer has no end-of-document (eos) piece")
        return eos

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole piece (e.g. a reserved role marker), None when the model lacks it."""
        index = self.sp.piece_to_id(piece)
        if index == self.sp.unk_id() or self.sp.id_to_piece(index) != piece:
            return None
        return index

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; `threads` > 1 encodes them on a thread pool kept for the life
        of this tokenizer (SentencePiece's default makes new threads on every call, and glibc
        gives new threads other malloc arenas: memory crept up with the number of calls)."""
        if self.threads <= 1:
            return [self.sp.encode(text) for text in texts]
        pool = self._pool()
        if pool is None:  # an older sentencepiece, without ThreadPool
            return self.sp.encode(texts, num_threads=self.threads)
        return self.sp.encode(texts, num_threads=self.threads, thread_pool=pool)

    def _pool(self):
        """SentencePiece's ThreadPool of `threads` threads (made again after a fork or a change
        of `threads`), or None when this sentencepiece has none."""
        key = (self.threads, os.getpid())
        if self.__dict__.get("_thread_pool", (None, None))[1] != key:
            make = getattr(spm, "ThreadPool", None)
            self._thread_pool = (make(self.threads) if make else None, key)
        return self._thread_pool[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_thread_pool", None)  # threads do not travel
        return state

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for [vocab] (0 for control tokens): for bits per byte."""
        sizes = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                sizes[i] = 1
            else:
                sizes[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode())
        return sizes
