"""Byte-level BPE (gptjax/data/bpe.py) behind the tokenizer interface, and tokenizer files found
by name (gptjax/data/tokenizer.py). Oracles: the text itself (exact round trip), its UTF-8 byte
count (bytes per token), and the `tokenizers` library's own encoding of the same files."""

import json
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from gptjax.data import tokenizer as tok  # noqa: E402
from gptjax.data.bpe import BPETokenizer  # noqa: E402
from gptjax.data.corpus import DataError  # noqa: E402

TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\t\tand\n\n\nnewlines\r\n",
    "héllo wörld ☃ 日本語 🤖 \u00a0 \u200b \u2581 \ufeff",
    "\x00\x01\x7f",
    "1234567890 3.14159e-10 0x1F",
    "<|endoftext|> is text here, not the end token",
]


def python_sources(n=60):
    return [p.read_text() for p in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:n]]


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    """(directory, BPETokenizer) of a GPT-2 style tokenizer trained here on Python sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(python_sources(), trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt
    return directory, BPETokenizer.load(directory / "tokenizer.json")


def test_round_trip_is_exact_and_special_strings_are_text(gpt2_style):
    _, bpe = gpt2_style
    texts = [*TRICKY, *python_sources(120)[60:]]  # sources it was not trained on
    for text in texts:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert bpe.eod_id == 0 and bpe.eod_id not in bpe.encode(TRICKY[-1])
    assert bpe.decode([bpe.eod_id, *bpe.encode("x")]) == "x"  # the end token decodes to nothing


def test_token_bytes_count_the_utf8_bytes(gpt2_style):
    _, bpe = gpt2_style
    sizes = bpe.token_bytes()
    assert sizes.shape == (bpe.vocab_size,) and sizes[bpe.eod_id] == 0
    for text in [*TRICKY, *python_sources(70)[60:]]:
        assert sizes[bpe.encode(text)].sum() == len(text.encode())


def test_vocab_and_merges_encode_like_tokenizer_json(gpt2_style):
    directory, bpe = gpt2_style
    pair = BPETokenizer.from_vocab_merges(directory / "vocab.json", directory / "merges.txt")
    assert pair.vocab_size == bpe.vocab_size and pair.eod_id == bpe.eod_id
    for text in [*TRICKY, *python_sources(65)[60:]]:
        assert pair.encode(text) == bpe.encode(text)


def test_tokenizer_files_are_found_by_name(gpt2_style, tmp_path):
    directory, bpe = gpt2_style
    run = tmp_path / "run"
    run.mkdir()
    assert tok.find(run) is None
    with pytest.raises(DataError, match="no tokenizer"):
        tok.load(run)
    bpe.save(run / bpe.filename)
    assert tok.find(run) == run / "tokenizer.json"
    loaded = tok.load(run)
    assert isinstance(loaded, BPETokenizer) and loaded.model_bytes == bpe.model_bytes
    assert isinstance(tok.load(run / "tokenizer.json"), BPETokenizer)


def _spec(directory):
    return json.loads((directory / "tokenizer.json").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer 'NFC' changes the text"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer is not Byte"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space=true"),
        (lambda s: s.update(decoder={"type": "Fuse"}), "decoder is not ByteLevel"),
        (lambda s: s["model"].update(type="WordPiece"), "model.type='WordPiece'"),
    ],
)
def test_what_would_not_round_trip_is_refused(gpt2_style, tmp_path, change, message):
    directory, _ = gpt2_style
    spec = _spec(directory)
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        BPETokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        BPETokenizer.load(path)


def test_bytes_per_token_on_a_larger_text(gpt2_style):
    _, bpe = gpt2_style
    text = "\n".join(python_sources(120)[60:])
    ids = np.asarray(bpe.encode(text))
    assert bpe.decode(ids.tolist()) == text
    assert bpe.token_bytes()[ids].sum() == len(text.encode())


def test_end_of_document_among_many_special_tokens(gpt2_style):
    """Llama 3's tokenizer.json has 256 special tokens and no <|endoftext|>: its document end is
    <|end_of_text|>; with neither and several special tokens the tokenizer says so in one line."""
    from tokenizers import AddedToken, Tokenizer

    directory, _ = gpt2_style
    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["<|reserved|>"] = vocab.pop("<|endoftext|>")  # no <|endoftext|> at all
    base = Tokenizer.from_str(json.dumps({**spec, "added_tokens": []}))
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    base.add_special_tokens([AddedToken(n, special=True) for n in names])
    llama = BPETokenizer(base.to_str().encode())
    assert llama.eod_id == llama.tokenizer.token_to_id("<|end_of_text|>")
    other = Tokenizer.from_str(json.dumps({**spec, "added_tokens": []}))
    other.add_special_tokens([AddedToken(n, special=True) for n in ("<s>", "<eos>")])
    with pytest.raises(DataError, match="and 2 special tokens; cannot tell which one ends"):
        _ = BPETokenizer(other.to_str().encode()).eod_id
