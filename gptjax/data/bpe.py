"""GPT-2 style byte-level BPE (a Hugging Face `tokenizer.json`) behind gptjax's tokenizer interface.

The `tokenizers` library (the `[hf]` extra) does the work. Only byte-level tokenizers are taken
(a ByteLevel pre-tokenizer and decoder, no normalizer, no added prefix space): every string maps
to its UTF-8 bytes and back, so `decode(encode(text)) == text` for any text. As with gptjax's
SentencePiece model, text is only text: a special token's string inside it (`<|endoftext|>`) is
encoded as ordinary characters, never as the special id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gptjax.data.corpus import DataError

GPT2_EOD = "<|endoftext|>"
END_OF_TEXT = (GPT2_EOD, "<|end_of_text|>")  # the document separator, by name
INSTALL = "pip install 'gptjax[hf]'"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            f"BPE tokenizers (tokenizer.json) need the `tokenizers` package: {INSTALL}"
        ) from None
    return tokenizers


def _components(spec: dict | None) -> list[dict]:
    """A pipeline component and, for a Sequence, its parts (tokenizer.json layout)."""
    if not spec:
        return []
    parts = spec.get("pretokenizers") or spec.get("decoders") or spec.get("normalizers")
    return [spec, *(parts or [])]


def _check_byte_level(spec: dict, where: str) -> None:
    """Refuse what would not round-trip bytes exactly, naming the tokenizer.json field."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise DataError(f"{where}: model.type={model.get('type')!r}; only BPE is supported")
    if spec.get("normalizer"):
        kind = spec["normalizer"].get("type")
        raise DataError(f"{where}: normalizer {kind!r} changes the text; only null is supported")
    pre = [p for p in _components(spec.get("pre_tokenizer")) if p.get("type") == "ByteLevel"]
    if not pre:
        raise DataError(f"{where}: pre_tokenizer is not ByteLevel (not a GPT-2 style tokenizer)")
    if any(p.get("add_prefix_space") for p in pre):
        raise DataError(f"{where}: pre_tokenizer.add_prefix_space=true adds a space to the text")
    if not any(d.get("type") == "ByteLevel" for d in _components(spec.get("decoder"))):
        raise DataError(f"{where}: decoder is not ByteLevel (not a GPT-2 style tokenizer)")


class BPETokenizer:
    """Byte-level BPE from a `tokenizer.json` (the bytes are kept as they were given)."""

    filename = "tokenizer.json"

    def __init__(self, model: bytes, where: str = "tokenizer.json"):
        tokenizers = _tokenizers()
        try:
            spec = json.loads(model)
            if not isinstance(spec, dict):
                raise ValueError("not an object")
            _check_byte_level(spec, where)  # first: a named field beats the parser's complaint
            tokenizer = tokenizers.Tokenizer.from_str(model.decode())
        except DataError:
            raise
        except Exception as error:  # noqa: BLE001 - bad JSON or the library's own error
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise DataError(f"{where}: not a tokenizers JSON file ({reason})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = True  # text is text (as in SentencePiece)
        self.model_bytes = model
        self.tokenizer = tokenizer
        self.where = where

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer not found: {path}")
        return cls(path.read_bytes(), str(path))

    @classmethod
    def from_vocab_merges(cls, vocab: str | Path, merges: str | Path) -> BPETokenizer:
        """GPT-2's original pair of files (`vocab.json`, `merges.txt`)."""
        tokenizers = _tokenizers()
        for path in (Path(vocab), Path(merges)):
            if not path.is_file():
                raise DataError(f"tokenizer file not found: {path}")
        try:
            model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as error:  # noqa: BLE001 - the library reports a bad file its own way
            raise DataError(f"{vocab}, {merges}: not a BPE vocabulary ({error})") from None
        tokenizer = tokenizers.Tokenizer(model)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        if tokenizer.token_to_id(GPT2_EOD) is not None:
            tokenizer.add_special_tokens([tokenizers.AddedToken(GPT2_EOD, special=True)])
        return cls(tokenizer.to_str().encode(), str(vocab))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_bytes)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids are 0 .. vocab_size - 1)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eod_id(self) -> int:
        """`<|endoftext|>` (GPT-2, Qwen2), else `<|end_of_text|>` (Llama 3, among its 256
        special tokens), else the tokenizer's only special token."""
        for name in END_OF_TEXT:
            eod = self.tokenizer.token_to_id(name)
            if eod is not None:
                return eod
        special = [i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special]
        if len(special) != 1:
            raise DataError(
                f"{self.where}: no {' or '.join(END_OF_TEXT)} token and {len(special)} special "
                "tokens; cannot tell which one ends a document"
            )
        return special[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for [vocab] (0 for special tokens): for bits per byte.

        A byte-level token's string has one character per byte it stands for."""
        sizes = np.zeros(self.vocab_size, np.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            sizes[i] = len(token)
        for i, added in self.tokenizer.get_added_tokens_decoder().items():
            sizes[i] = 0 if added.special else len(added.content.encode())
        return sizes
