"""Hugging Face GPT-2 import and export, against transformers itself.

The oracle is `transformers.GPT2LMHeadModel` in f32 on the same weights: a tiny random model
built here (every bias and LayerNorm perturbed away from 0/1, weights large enough that logits
are well separated), saved the ways real checkpoints are (safetensors with the `transformer.`
prefix, pytorch_model.bin without it and with the old `attn.bias` mask buffers, shards with an
index, an untied head).
"""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from gptjax import cli, config  # noqa: E402
from gptjax.core import steps  # noqa: E402
from gptjax.data import tokenizer as tok  # noqa: E402
from gptjax.inference import generate  # noqa: E402
from gptjax.interop import hf  # noqa: E402
from gptjax.training import loop, runs  # noqa: E402

# f32 on both sides; the two compute attention and layer norms in different orders. Measured
# max |difference| on these models (logits up to ~8): 5.8e-6; on a random model with GPT-2
# small's shapes: 3.6e-6.
ATOL = 1e-4
TEXT = "def parse(line):\n    return [int(x) for x in line.split(',')]  # ünïcode ☃\n" * 3


def bpe_tokenizer(n_merges: int = 200):
    """A GPT-2 style byte-level BPE trained here on a little Python source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=257 + n_merges,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (shutil.__file__, json.__file__, logging.__file__)
    tokenizer.train_from_iterator([open(path).read() for path in text], trainer)
    return tokenizer


def hf_model(vocab: int, tied: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tied,
        eos_token_id=0,
        bos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.3 * torch.randn_like(p))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{variant: (directory, transformers model)} for three ways a GPT-2 checkpoint is stored."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = bpe_tokenizer()
    vocab = tokenizer.get_vocab_size()
    dirs = {}
    model = hf_model(vocab)
    model.save_pretrained(root / "safetensors")  # keys "transformer.h.0...."
    tokenizer.save(str(root / "safetensors" / "tokenizer.json"))
    dirs["safetensors"] = (root / "safetensors", model)

    # pytorch_model.bin as the original GPT-2 files: no prefix, causal-mask buffers included,
    # vocab.json + merges.txt instead of tokenizer.json
    binary = root / "bin"
    binary.mkdir()
    model.config.save_pretrained(binary)
    state = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, binary / "pytorch_model.bin")
    tokenizer.model.save(str(binary))
    dirs["bin"] = (binary, model)

    sharded = root / "sharded"  # model-0000k-of-0000n.safetensors + model.safetensors.index.json
    model.save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save(str(sharded / "tokenizer.json"))
    dirs["sharded"] = (sharded, model)

    untied = hf_model(vocab, tied=False, seed=1)
    untied.save_pretrained(root / "untied")
    tokenizer.save(str(root / "untied" / "tokenizer.json"))
    dirs["untied"] = (root / "untied", untied)
    return dirs


def gptjax_logits(run_dir, ids):
    setup, params, _ = runs.load_run(run_dir)
    return np.asarray(nnx.merge(setup.graphdef, params)(np.asarray(ids, np.int32)))


@pytest.mark.parametrize("variant", ["safetensors", "bin", "sharded", "untied"])
def test_import_matches_transformers(hf_dirs, tmp_path, variant):
    directory, model = hf_dirs[variant]
    if variant == "sharded":
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    run = hf.import_run(directory, tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "tokenizer.json"]
    setup, params, tokenizer = runs.load_run(run)
    V = model.config.vocab_size
    padded = setup.cfg.model.vocab_size
    assert padded % 128 == 0 and padded - 128 < V < padded and setup.cfg.model.vocab_valid == V
    assert tokenizer.vocab_size == V

    ids = np.array([tokenizer.encode(TEXT)[:64], tokenizer.encode(TEXT[7:])[:64]])
    ours = gptjax_logits(run, ids)
    theirs = hf_logits(model, ids)
    np.testing.assert_allclose(ours[..., :V], theirs, atol=ATOL, rtol=0)
    assert np.all(ours[..., V:] == -np.inf)  # the padding never gets probability

    batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32)}
    loss = float(steps.token_losses(setup.graphdef, params, batch).mean())
    with torch.no_grad():
        expected = float(model(torch.tensor(ids), labels=torch.tensor(ids)).loss)
    assert loss == pytest.approx(expected, abs=1e-5)


def test_import_then_export_gives_identical_tensors(hf_dirs, tmp_path):
    directory, _ = hf_dirs["safetensors"]
    run = hf.import_run(directory, tmp_path / "run")
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    before = safetensors_numpy.load_file(directory / "model.safetensors")
    after = safetensors_numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((directory / "config.json").read_text())
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id"):
        assert config[field] == original[field], field
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        directory / "tokenizer.json"
    ).read_bytes()


def load_exported(out):
    """transformers' model and tokenizer from `out`; every weight found, none left over."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {key: list(value) for key, value in info.items() if value} == {}
    return model.eval(), transformers.AutoTokenizer.from_pretrained(out)


def greedy_agrees(run, model, prompt, n=32):
    """gptjax's greedy continuation (sample at temperature 0) and transformers' generate."""
    setup, params, tokenizer = runs.load_run(run)
    ours = generate.sample(
        setup, params, tokenizer, prompt, max_new_tokens=n, temperature=0, stop_at_eod=False
    )
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == n
    assert ours == prompt + tokenizer.decode(new)
    # the same ids, each chosen by a clear margin (far above the ~1e-6 f32 disagreement)
    logits = gptjax_logits(run, out[:, :-1].numpy())[0, ids.shape[1] - 1 :]
    assert logits.argmax(-1).tolist() == new
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4
    return new


def text_dir(tmp_path):
    """A small corpus: 40 standard-library modules."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:40]:
        shutil.copy(path, corpus / f"{path.stem}.txt")
    return corpus


@pytest.mark.slow
def test_fine_tuned_import_exports_to_transformers(hf_dirs, tmp_path, cache_dir, capsys):
    """Import -> eval -> fine-tune on a (2, 2, 2) mesh -> export -> transformers, same numbers."""
    directory, original = hf_dirs["safetensors"]
    run = tmp_path / "run"
    settings = [
        f"data.cache_dir={cache_dir}",
        f"data.source=text_dir:{text_dir(tmp_path)}",
        "model.seq_len=64",
        "train.batch_size=8",
        "train.steps=3",
        "train.eval_every=0",
        "train.eval_steps=1",
        "optim.warmup_steps=0",
        "optim.lr=1e-3",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    ]
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run), *settings]) == 0
    capsys.readouterr()
    cfg = config.load(run / "config.yaml")
    assert (cfg.train.steps, cfg.model.seq_len, cfg.mesh.fsdp) == (3, 64, 2)

    # eval of the imported run == transformers' loss on the same validation windows
    assert cli.main(["eval", str(run), "--batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    data = runs.load_data(cfg, run)
    rows = data.val_rows(0, 8, 0, 8).astype(np.int64)
    with torch.no_grad():
        logits = original(torch.tensor(rows[:, :-1])).logits
        nats = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.tensor(rows[:, 1:]).flatten(), reduction="sum"
        ).item()
    assert result["eval_loss"] == pytest.approx(nats / rows[:, 1:].size, abs=1e-5)
    n_bytes = data.token_bytes[rows[:, 1:]].sum()
    assert result["eval_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)

    # fine-tune: resumes the imported step 0 with fresh AdamW state, on 8 devices
    before = runs.load_run(run)[1]
    assert loop.train(cfg, progress=False)["final_step"] == 3
    after = runs.load_run(run)[1]
    assert not np.allclose(np.asarray(after["wte"]), np.asarray(before["wte"]))

    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, tokenizer = load_exported(out)
    assert tokenizer.encode(TEXT) == data.tokenizer.encode(TEXT)
    ids = np.array([data.tokenizer.encode(TEXT)[:64]])
    np.testing.assert_allclose(
        gptjax_logits(run, ids)[..., : model.config.vocab_size], hf_logits(model, ids), atol=ATOL
    )
    greedy_agrees(run, model, "def parse(")


class Payload:
    """Something a weights-only unpickler must refuse to build."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _edit_config(**changes):
    def edit(directory):
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _edit_tensors(change):
    def edit(directory):
        path = directory / "model.safetensors"
        tensors = safetensors_numpy.load_file(path)
        change(tensors)
        safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})

    return edit


def _pickle_payload(directory):
    (directory / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.ones(2), "extra": Payload()}, directory / "pytorch_model.bin")


def _wrong_shape(tensors):
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)


def _untied_head(tensors):
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1


def _unexpected(tensors):
    tensors["transformer.h.0.crossattention.c_attn.weight"] = np.zeros((32, 64), np.float32)


UNSUPPORTED = {
    "model_type": (_edit_config(model_type="gptj"), "model_type='gptj'"),
    "activation": (_edit_config(activation_function="relu"), "activation_function='relu'"),
    "architecture": (_edit_config(architectures=["GPT2ForQuestionAnswering"]), "architectures="),
    "inverse_layer_scaling": (
        _edit_config(scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx=True",
    ),
    "missing": (
        _edit_tensors(lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
        "missing tensor h.1.mlp.c_fc.bias",
    ),
    "shape": (_edit_tensors(_wrong_shape), "tensor h.0.attn.c_attn.weight has shape [96, 32]"),
    "untied": (_edit_tensors(_untied_head), "lm_head.weight differs from wte.weight"),
    "unexpected": (_edit_tensors(_unexpected), "unexpected tensor h.0.crossattention.c_attn"),
    "pickle": (_pickle_payload, "refusing to unpickle"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "no_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_checkpoints_are_one_line(hf_dirs, tmp_path, capsys, case):
    edit, message = UNSUPPORTED[case]
    directory = tmp_path / "hf"
    shutil.copytree(hf_dirs["safetensors"][0], directory)
    edit(directory)
    run = tmp_path / "run"
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run)]) == 2
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), captured.err
    assert message in lines[0]
    assert not run.exists() and not any(tmp_path.glob(".run.import-*"))


def test_import_refuses_an_existing_run_and_shape_overrides(hf_dirs, tmp_path, capsys):
    directory = hf_dirs["safetensors"][0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    args = ["import", "hf", str(directory), "--run-dir", str(tmp_path / "new"), "model.n_layer=3"]
    assert cli.main(args) == 2
    assert "model.n_layer comes from" in capsys.readouterr().err


TRICKY = [
    "",
    " ",
    "  two  spaces,\ttabs\t\tand\n\n\nnewlines \n",
    "    indented = {'a': 1}\r\n",
    "héllo wörld ☃ 日本語 🤖 \u00a0nbsp \u200bzero-width",
    "\x00\x01\x7f control bytes",
    "1234567890 3.14159e-10",
    "</s> <unk> <s> <|endoftext|> text that looks special",
]


@pytest.mark.slow
def test_gptjax_run_exports_with_its_sentencepiece_tokenizer(tmp_path, cache_dir):
    """A run trained here (SentencePiece tokenizer) -> export -> transformers: the same ids for
    every validation document, the same text back, the same logits and greedy tokens."""
    from gptjax.data import array_records, pipeline

    run = tmp_path / "run"
    cfg = tiny_config(run, cache_dir, "train.eval_every=0", "checkpoint.every=0")
    loop.train(cfg, progress=False)
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, theirs = load_exported(out)
    ours = tok.load(run)

    docs = array_records.open_documents(cfg.data, pipeline.cache_root(cfg.data))
    texts = [*docs.val.texts(np.arange(len(docs.val))), *TRICKY]
    assert sum(len(t) for t in texts) > 500_000
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text[:80]
        assert theirs.decode(ids) == ours.decode(ids) == text.replace("\u2581", " ")

    ids = np.array([ours.encode(TEXT)[:64]])
    logits = gptjax_logits(run, ids)
    np.testing.assert_allclose(logits, hf_logits(model, ids), atol=ATOL)
    greedy_agrees(run, model, "import os\n")

    # and back: the export imports as a run with the same tokenizer and the same logits
    again = hf.import_run(out, tmp_path / "again")
    assert (again / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    np.testing.assert_array_equal(gptjax_logits(again, ids), logits)
