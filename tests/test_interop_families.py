"""Hugging Face both ways for every family gptjax imports (openai-gpt, gpt2, gpt_neo, llama,
mistral, qwen2), against transformers itself in f32.

Import: a tiny random transformers model of each model_type (every weight, bias and norm gain
perturbed; GQA, an explicit head_dim, RoPE scaling, sliding windows and biases where the family
has them) saved with `save_pretrained` -> `gptjax import hf` -> the same logits (1e-4), the same
loss, and the same 32 greedy tokens as transformers' `generate` (gptjax's KV-cache path: ring
buffers for the windowed layers, RoPE positions in decode). Export: a tiny random gptjax model
of each family -> config.json + safetensors + tokenizer -> transformers loads it with no missing
or unexpected weights and gives the same logits, and its greedy tokens are gptjax's argmax at
every step. A field or tensor gptjax cannot compute is one line naming it.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from test_interop_hf import ATOL, TEXT, bpe_tokenizer, greedy_agrees, hf_logits  # noqa: E402

from gptjax import cli, config  # noqa: E402
from gptjax.core import model as model_module  # noqa: E402
from gptjax.core import steps  # noqa: E402
from gptjax.data.bpe import BPETokenizer  # noqa: E402
from gptjax.interop import hf, hf_families  # noqa: E402
from gptjax.training import runs  # noqa: E402

D, L, N, POSITIONS = 64, 2, 4, 64


def hf_config(kind: str, vocab: int):
    """A tiny transformers config of each model_type (vocab = the tokenizer's size)."""
    t = transformers
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    llama = dict(
        hidden_size=D, intermediate_size=96, num_hidden_layers=L, num_attention_heads=N,
        max_position_embeddings=POSITIONS, rms_norm_eps=1e-5, **common,
    )  # fmt: skip
    if kind == "openai-gpt":
        return t.OpenAIGPTConfig(
            n_positions=POSITIONS, n_embd=D, n_layer=L, n_head=N, layer_norm_epsilon=1e-6,
            **common,
        )  # fmt: skip
    if kind == "gpt2":  # the exact GELU, an MLP width that is not 4 · D
        return t.GPT2Config(
            n_positions=POSITIONS, n_embd=D, n_layer=L, n_head=N, n_inner=96,
            activation_function="gelu", layer_norm_epsilon=1e-6, **common,
        )  # fmt: skip
    if kind == "gpt_neo":  # global, local (window 5: shorter than the sequences)
        return t.GPTNeoConfig(
            max_position_embeddings=POSITIONS, hidden_size=D, num_layers=L, num_heads=N,
            attention_types=[[["global", "local"], L // 2]], window_size=5, **common,
        )  # fmt: skip
    if kind == "llama":  # GQA, head_dim 32 (N · H = 128 != D), biases, Llama-3 RoPE scaling
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }  # fmt: skip
        return t.LlamaConfig(
            num_key_value_heads=2, head_dim=32, attention_bias=True, mlp_bias=True,
            rope_parameters=rope, tie_word_embeddings=False, **llama,
        )  # fmt: skip
    if kind == "mistral":  # multi-query, every layer a window of 6
        return t.MistralConfig(
            num_key_value_heads=1, sliding_window=6, tie_word_embeddings=False, **llama
        )
    if kind == "qwen2":  # qkv bias, tied, a dense then a sliding (5) layer
        return t.Qwen2Config(
            num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
            sliding_window=5, max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **llama,
        )  # fmt: skip
    raise AssertionError(kind)


KINDS = ["openai-gpt", "gpt2", "gpt_neo", "llama", "mistral", "qwen2"]
# the gptjax block each import must arrive at
EXPECTED = {
    "openai-gpt": dict(norm_placement="post", final_norm=False, mlp="gelu_tanh", norm_eps=1e-6),
    "gpt2": dict(mlp="gelu", d_ff=96, norm_eps=1e-6),
    "gpt_neo": dict(attention_pattern=("dense", "local:5"), qkv_bias=False, attention_scale=1.0),
    "llama": dict(n_kv_head=2, head_dim=32, positions="rope", norm="rmsnorm", mlp="swiglu"),
    "mistral": dict(n_kv_head=1, attention_pattern=("local:6",), qkv_bias=False),
    "qwen2": dict(attention_pattern=("dense", "local:5"), qkv_bias=True, attn_out_bias=False),
}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(100)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    """{model_type: (directory, transformers model)}: random, every parameter perturbed."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, kind in enumerate(KINDS):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config(kind, tokenizer.get_vocab_size())
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                gain = name.endswith("norm.weight") or ".ln_" in name or "ln_f" in name
                base = 1.0 if gain and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
        model.save_pretrained(root / kind)
        tokenizer.save(str(root / kind / "tokenizer.json"))
        out[kind] = (root / kind, model)
    return out


def gptjax_logits(setup, params, ids):
    return np.asarray(nnx.merge(setup.graphdef, params)(np.asarray(ids, np.int32)))


def sample_ids(tokenizer, n=48):
    return np.array([tokenizer.encode(TEXT).ids[:n], tokenizer.encode(TEXT[9:]).ids[:n]])


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers(hf_dirs, tokenizer, tmp_path, kind):
    directory, theirs = hf_dirs[kind]
    assert json.loads((directory / "config.json").read_text())["model_type"] == kind
    run = tmp_path / "run"
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run)]) == 0
    setup, params, _ = runs.load_run(run)
    got = setup.cfg.model
    for name, value in EXPECTED[kind].items():
        assert getattr(got, name) == value, name

    ids = sample_ids(tokenizer)
    V = tokenizer.get_vocab_size()
    ours = gptjax_logits(setup, params, ids)
    np.testing.assert_allclose(ours[..., :V], hf_logits(theirs, ids), atol=ATOL, rtol=0)
    batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32)}
    loss = float(steps.token_losses(setup.graphdef, params, batch).mean())
    with torch.no_grad():
        expected = float(theirs(torch.tensor(ids), labels=torch.tensor(ids)).loss)
    assert loss == pytest.approx(expected, abs=1e-5)
    # 32 greedy tokens from gptjax's KV cache == transformers' generate (past every window)
    greedy_agrees(run, theirs, "def parse(line):", n=32)


# gptjax blocks of each family, exported (tiny; windows shorter than the sequences)
LLAMA = dict(
    norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, qkv_bias=False,
    attn_out_bias=False, mlp_bias=False, tie_embeddings=False, d_ff=96, norm_eps=1e-5,
)  # fmt: skip
GPTJAX = {
    "openai-gpt": dict(norm_placement="post", final_norm=False),
    "gpt2": dict(mlp="gelu", norm_eps=1e-6, tie_embeddings=False, d_ff=160),
    "gpt_neo": dict(attention_pattern=("dense", "local:5"), qkv_bias=False, attention_scale=1.0),
    "llama": {
        **LLAMA,
        "rope_theta": 5e5,
        "qkv_bias": True,
        "attn_out_bias": True,
        "mlp_bias": True,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position": 16},
    },  # fmt: skip
    "mistral": {**LLAMA, "attention_pattern": ("local:6",), "n_kv_head": 1, "head_dim": 32},
    "qwen2": {
        **LLAMA,
        "qkv_bias": True,
        "tie_embeddings": True,
        "attention_pattern": ("local:5", "dense"),
    },  # fmt: skip
}


def gptjax_model(changes: dict, vocab: int) -> config.ModelConfig:
    base = dict(vocab_size=384, vocab_valid=vocab, seq_len=POSITIONS, n_layer=L, n_head=N,
                d_model=D, dtype="float32")  # fmt: skip
    return config.ModelConfig(**{**base, **changes})


def random_params(cfg, seed):
    params = model_module.init_params(cfg, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("kind", KINDS)
def test_gptjax_model_exports_to_transformers(tokenizer, tmp_path, kind):
    ours_tok = BPETokenizer(tokenizer.to_str().encode())
    cfg = gptjax_model(GPTJAX[kind], ours_tok.vocab_size)
    assert hf_families.family_of_model(cfg).model_type == kind
    params = random_params(cfg, KINDS.index(kind))
    out = hf.write_hf(tmp_path / "out", cfg, hf_families.FAMILIES[kind], params, ours_tok)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {key: list(value) for key, value in info.items() if value} == {}
    model.eval()
    assert model.config.model_type == kind

    ids = sample_ids(tokenizer)
    graphdef = model_module.abstract(cfg)[0]
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    logits = np.asarray(forward(params, ids.astype(np.int32)))
    V = ours_tok.vocab_size
    np.testing.assert_allclose(logits[..., :V], hf_logits(model, ids), atol=ATOL, rtol=0)
    assert np.all(logits[..., V:] == -np.inf)

    # transformers' 32 greedy tokens are gptjax's argmax at every step, by a clear margin
    prompt = ids[:1, :6]
    with torch.no_grad():
        new = model.generate(
            torch.tensor(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )[0, 6:].numpy()  # fmt: skip
    seq = np.concatenate([prompt[0], new])[None, :-1].astype(np.int32)
    steps_logits = np.asarray(forward(params, seq))[0, 5:]
    assert steps_logits.argmax(-1).tolist() == new.tolist()
    top2 = np.sort(steps_logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4


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


REFUSED = {
    "activation": ("llama", _edit_config(hidden_act="gelu"), "hidden_act='gelu'"),
    "rope_type": (
        "llama",
        _edit_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        "rope_type='dynamic'",
    ),
    "partial_rope": (
        "qwen2",
        _edit_config(partial_rotary_factor=0.5),
        "partial_rotary_factor=0.5",
    ),
    "yarn_mscale": (
        "mistral",
        _edit_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}),
        "rope_parameters.mscale=0.7",
    ),
    "neo_attention": (
        "gpt_neo",
        _edit_config(attention_types=[[["global", "sparse"], 1]]),
        "attention_types has 'sparse'",
    ),
    "openai_afn": ("openai-gpt", _edit_config(afn="relu"), "afn='relu'"),
    "missing": (
        "mistral",
        _edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "missing tensor layers.1.mlp.up_proj.weight",
    ),
    "unexpected": (
        "qwen2",
        _edit_tensors(
            lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(D, np.float32)})
        ),
        "unexpected tensor layers.0.self_attn.o_proj.bias",
    ),
    "model_type": ("gpt2", _edit_config(model_type="gptj"), "model_type='gptj'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fields_gptjax_cannot_compute_are_one_line(hf_dirs, tmp_path, capsys, case):
    kind, edit, message = REFUSED[case]
    directory = tmp_path / "hf"
    shutil.copytree(hf_dirs[kind][0], directory)
    edit(directory)
    run = tmp_path / "run"
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), lines
    assert message in lines[0]
    assert not run.exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(qk_norm=True, **LLAMA), "the nearest, llama, cannot compute model.qk_norm=True"),
        (dict(mlp="relu2"), "cannot compute model.mlp='relu2'"),
        (dict(positions="none"), "model.positions=none"),
    ],
    ids=["qk_norm", "relu2", "no_positions"],
)
def test_export_refuses_a_model_no_family_computes(tmp_path, capsys, changes, message):
    """Refused from the run's config.yaml, before any weight is read or anything written."""
    run = tmp_path / "run"
    run.mkdir()
    model = {**dict(n_layer=L, n_head=N, d_model=D), **changes}
    (run / "config.yaml").write_text(
        config.load(None, [f"model.{k}={json.dumps(v)}" for k, v in model.items()]).to_yaml()
    )
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()
