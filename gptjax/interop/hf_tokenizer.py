"""Tokenizers across the Hugging Face boundary.

Import: a HF directory's tokenizer as a gptjax tokenizer: `tokenizer.model` (a gptjax export:
SentencePiece, used as is), else `tokenizer.json`, else GPT-2's `vocab.json` + `merges.txt` (both
byte-level BPE, gptjax/data/bpe.py).

Export: `tokenizer.json` + `tokenizer_config.json` that `transformers.AutoTokenizer` loads and
that encode text to the same ids as gptjax and decode ids to the same text. A byte-level BPE is
written as it is. gptjax's SentencePiece model is converted by transformers' own converter
(`SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's normaliser settings,
byte fallback and user-defined pieces) and saved beside a copy of `tokenizer.model`.
`split_special_tokens: true` makes transformers treat text as text, as gptjax does: the string of
a special token (`</s>`, `<|endoftext|>`) inside text is encoded as ordinary characters.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptjax.data import tokenizer as tok
from gptjax.data.bpe import BPETokenizer
from gptjax.interop import INSTALL_HINT, InteropError


def load(directory: Path) -> tok.TextTokenizer:
    """The tokenizer of a HF model directory, as a gptjax tokenizer."""
    if (directory / tok.Tokenizer.filename).is_file():
        return tok.Tokenizer.load(directory / tok.Tokenizer.filename)
    if (directory / BPETokenizer.filename).is_file():
        return BPETokenizer.load(directory / BPETokenizer.filename)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return BPETokenizer.from_vocab_merges(directory / "vocab.json", directory / "merges.txt")
    raise InteropError(f"{directory} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


def sentencepiece_to_tokenizers(tokenizer: tok.Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model."""
    try:
        from tokenizers import AddedToken
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError:
        raise InteropError(f"exporting a tokenizer needs transformers: {INSTALL_HINT}") from None
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    converted = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # unknown, control
    converted.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    return converted


def save(tokenizer: tok.TextTokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (and tokenizer.model for SentencePiece) in `out`."""
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if isinstance(tokenizer, BPETokenizer):
        (out / BPETokenizer.filename).write_bytes(tokenizer.model_bytes)
        eod = tokenizer.tokenizer.id_to_token(tokenizer.eod_id)
        settings.update(bos_token=eod, eos_token=eod, unk_token=eod)
    elif isinstance(tokenizer, tok.Tokenizer):
        converted = sentencepiece_to_tokenizers(tokenizer)
        converted.save(str(out / BPETokenizer.filename))
        tokenizer.save(out / tok.Tokenizer.filename)
        settings["eos_token"] = tokenizer.sp.id_to_piece(tokenizer.eod_id)
        if tokenizer.sp.unk_id() >= 0:
            settings["unk_token"] = tokenizer.sp.id_to_piece(tokenizer.sp.unk_id())
    else:
        raise InteropError(f"cannot export a {type(tokenizer).__name__} tokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
