"""Hugging Face both ways for every family gptjax imports (openai-gpt, gpt2, gpt_neo, llama,
mistral, qwen2, qwen3), against transformers itself in f32.

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

from test_interop_hf import (  # noqa: E402
    ATOL,
    TEXT,
    _edit_config,
    _edit_tensors,
    bpe_tokenizer,
    hf_logits,
)

from gptjax import cli, config  # noqa: E402
from gptjax.core import model as model_module  # noqa: E402
from gptjax.data.bpe import BPETokenizer  # noqa: E402
from gptjax.inference import generate  # noqa: E402
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
    if kind == "gpt2":  # the exact GELU, an MLP width that is not 4 · D, an untied head
        return t.GPT2Config(
            n_positions=POSITIONS, n_embd=D, n_layer=L, n_head=N, n_inner=96,
            activation_function="gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
            **common,
        )  # fmt: skip
    if kind == "gpt_neo":  # global, local (window 5: shorter than the sequences)
        return t.GPTNeoConfig(
            max_position_embeddings=POSITIONS, hidden_size=D, num_layers=L, num_heads=N,
            attention_types=[[["global", "local"], L // 2]], window_size=5, **common,
        )  # fmt: skip
    if kind == "llama":  # GQA, head_dim 32 (N · H = 128 != D), biases, YaRN RoPE
        rope = {
            "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "beta_fast": 16.0,
            "original_max_position_embeddings": 16,
        }  # fmt: skip
        return t.LlamaConfig(
            num_key_value_heads=2, head_dim=32, attention_bias=True, mlp_bias=True,
            rope_parameters=rope, tie_word_embeddings=False, **llama,
        )  # fmt: skip
    if kind == "mistral":  # multi-query, every layer a window of 6, Llama-3 RoPE scaling
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }  # fmt: skip
        return t.MistralConfig(
            num_key_value_heads=1, sliding_window=6, tie_word_embeddings=False,
            rope_parameters=rope, **llama,
        )  # fmt: skip
    if kind == "qwen2":  # qkv bias, tied, a dense then a sliding (5) layer
        return t.Qwen2Config(
            num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
            sliding_window=5, max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **llama,
        )  # fmt: skip
    if kind == "qwen3":  # qk-norm, q/k/v/o biases, GQA, head_dim 32 (N · H = 128 != D)
        return t.Qwen3Config(
            num_key_value_heads=2, head_dim=32, attention_bias=True, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **llama,
        )  # fmt: skip
    if kind == "mixtral":  # 4 experts, top 2, GQA, an aux-loss coefficient carried
        return t.MixtralConfig(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            router_aux_loss_coef=0.02, **llama,
        )  # fmt: skip
    if kind == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 of 4 experts, top 2
        return t.Qwen3MoeConfig(
            num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=False, **llama,
        )  # fmt: skip
    if kind == "gpt_oss":  # sinks, sliding (5) then full, YaRN, biases, clamped SwiGLU experts
        rope = {
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 16.0,
            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16,
        }  # fmt: skip
        return t.GptOssConfig(
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=5, rope_parameters=rope, swiglu_limit=1.5, **llama,
        )  # fmt: skip
    raise AssertionError(kind)


KINDS = ["openai-gpt", "gpt2", "gpt_neo", "llama", "mistral", "qwen2", "qwen3"]
MOE_KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]
KINDS += MOE_KINDS
# the gptjax block each import must arrive at
EXPECTED = {
    "openai-gpt": dict(norm_placement="post", final_norm=False, mlp="gelu_tanh", norm_eps=1e-6),
    "gpt2": dict(mlp="gelu", d_ff=96, norm_eps=1e-6, tie_embeddings=False),
    "gpt_neo": dict(attention_pattern=("dense", "local:5"), qkv_bias=False, attention_scale=1.0),
    "llama": dict(n_kv_head=2, head_dim=32, positions="rope", norm="rmsnorm", mlp="swiglu"),
    "mistral": dict(n_kv_head=1, attention_pattern=("local:6",), qkv_bias=False),
    "qwen2": dict(attention_pattern=("dense", "local:5"), qkv_bias=True, attn_out_bias=False),
    "qwen3": dict(qk_norm=True, n_kv_head=2, head_dim=32, qkv_bias=True, attn_out_bias=True),
    "mixtral": dict(n_kv_head=2, qkv_bias=False, attention_pattern=("dense",)),
    "qwen3_moe": dict(qk_norm=True, head_dim=32, d_ff=96),
    "gpt_oss": dict(
        attention_sinks=True,
        attention_pattern=("local:5", "dense"),
        head_dim=16,
        qkv_bias=True,
        attn_out_bias=True,
    ),
}
# the mixture of experts each import must arrive at
EXPECTED_MOE = {
    "mixtral": dict(experts=4, top_k=2, d_ff=None, gating="topk_softmax", aux_loss=0.02),
    "qwen3_moe": dict(
        experts=4, top_k=2, d_ff=32, dense_layers=(0,), gating="softmax_topk", renormalize=False
    ),
    "gpt_oss": dict(
        experts=4,
        top_k=2,
        router_bias=True,
        expert_bias=True,
        activation="swiglu_clamped",
        limit=1.5,
        alpha=1.702,
        gating="topk_softmax",
    ),
}
SCALING = {
    "llama": dict(type="yarn", factor=4.0, original_max_position=16, beta_fast=16.0),
    "mistral": dict(type="llama3", factor=8.0, original_max_position=16),
    "gpt_oss": dict(
        type="yarn", factor=4.0, original_max_position=16, beta_fast=16.0, truncate=False
    ),
}
# gptjax's own greedy decoding (generate: the KV cache, ~5 s of compiling per family) against
# transformers' generate for the family whose cache differs most from GPT-2's: mistral (every
# layer a ring of its window, RoPE positions in decode, one key/value head), and gpt_oss (a
# window, sinks, and every decoded token routed on its own through the experts). The cache of
# windows, GQA, RoPE and sinks is checked against full recompute in tests/test_families.py; here,
# for all of them, each of transformers' greedy tokens is gptjax's argmax after the same prefix.
DECODED = ("mistral", "gpt_oss")


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


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    """{model_type: run directory}: each HF directory through `gptjax import hf`."""
    root = tmp_path_factory.mktemp("imported")
    for kind, (directory, _) in hf_dirs.items():
        assert cli.main(["import", "hf", str(directory), "--run-dir", str(root / kind)]) == 0
    return {kind: root / kind for kind in hf_dirs}


FORWARD = jax.jit(lambda graphdef, p, t: nnx.merge(graphdef, p)(t), static_argnums=0)
PROMPT = "def parse(line):"
NEW = 32


def hf_greedy(model, prompt_ids):
    """transformers' 32 greedy tokens after `prompt_ids`."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    new = out[0, len(prompt_ids) :].tolist()
    assert len(new) == NEW
    return new


def rows_and_greedy(tokenizer, prompt_ids, new):
    """One batch for one compile: two text rows and the prompt + greedy row, equally long."""
    T = len(prompt_ids) + NEW
    texts = [tokenizer.encode(TEXT).ids[:T], tokenizer.encode(TEXT[9:]).ids[:T]]
    return np.array([*texts, [*prompt_ids, *new]], np.int32)


def check_greedy(logits_TV, n_prompt, new):
    """Each greedy token is the argmax of gptjax's logits at its step, by a clear margin (far
    above the ~1e-6 f32 disagreement)."""
    steps_logits = logits_TV[n_prompt - 1 : -1]
    assert steps_logits.argmax(-1).tolist() == new
    top2 = np.sort(steps_logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4


def nll(logits, ids):
    """Mean next-token cross-entropy of logits [B, T, V] (float64)."""
    x = logits[:, :-1].astype(np.float64)
    top = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(x, ids[:, 1:, None], -1)[..., 0]
    return float((logz - picked).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers(hf_dirs, imported, tokenizer, kind):
    directory, theirs = hf_dirs[kind]
    assert json.loads((directory / "config.json").read_text())["model_type"] == kind
    setup, params, ours_tok = runs.load_run(imported[kind])
    got = setup.cfg.model
    for name, value in EXPECTED[kind].items():
        assert getattr(got, name) == value, name
    assert (got.moe is not None) == (kind in MOE_KINDS)
    for name, value in EXPECTED_MOE.get(kind, {}).items():
        assert getattr(got.moe, name) == value, name
    scaling = got.rope_scaling and got.rope_scaling.model_dump(exclude_defaults=True)
    assert scaling == SCALING.get(kind)

    prompt_ids = ours_tok.encode(PROMPT)
    new = hf_greedy(theirs, prompt_ids)
    ids = rows_and_greedy(tokenizer, prompt_ids, new)
    V = tokenizer.get_vocab_size()
    ours = np.asarray(FORWARD(setup.graphdef, params, ids))
    expected = hf_logits(theirs, ids)
    np.testing.assert_allclose(ours[..., :V], expected, atol=ATOL, rtol=0)
    assert np.all(ours[..., V:] == -np.inf)  # the padding never gets probability
    with torch.no_grad():
        t = torch.tensor(ids.astype(np.int64))
        loss = float(theirs(t, labels=t).loss)
    assert nll(ours, ids) == pytest.approx(loss, abs=1e-5)
    check_greedy(ours[2], len(prompt_ids), new)
    if kind not in DECODED:
        return
    # gptjax's own greedy decoding gives the same 32 tokens, well past every window
    text = generate.sample(
        setup, params, ours_tok, PROMPT, max_new_tokens=NEW, temperature=0, stop_at_eod=False
    )
    assert text == PROMPT + ours_tok.decode(new)


def random_params(cfg, seed):
    """Every parameter random around its initial value (norm gains 1, the rest 0), in NumPy
    from the model's own shapes (no JAX initialisation to compile)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for name, shape in model_module.param_shapes(cfg).items():
        base = 1.0 if name.endswith(("_scale", "q_norm", "k_norm")) else 0.0
        *parents, last = name.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return params


@pytest.mark.parametrize("kind", KINDS)
def test_gptjax_model_exports_to_transformers(imported, tokenizer, tmp_path, kind):
    """The block gptjax imported (so the forward program is already compiled) with new random
    weights of its own, exported as the model_type that computes it."""
    cfg = runs.read_config(imported[kind]).model
    ours_tok = BPETokenizer(tokenizer.to_str().encode())
    family = hf_families.family_of_model(cfg)
    assert family.model_type == kind
    params = random_params(cfg, 10 + KINDS.index(kind))
    out = hf.write_hf(tmp_path / "out", cfg, family, params, ours_tok)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {key: list(value) for key, value in info.items() if value} == {}
    model.eval()
    assert model.config.model_type == kind

    prompt_ids = ours_tok.encode(PROMPT)
    new = hf_greedy(model, prompt_ids)
    ids = rows_and_greedy(tokenizer, prompt_ids, new)
    logits = np.asarray(FORWARD(model_module.abstract(cfg)[0], params, ids))
    assert np.all(logits[..., ours_tok.vocab_size :] == -np.inf)
    V = ours_tok.vocab_size
    np.testing.assert_allclose(logits[..., :V], hf_logits(model, ids), atol=ATOL, rtol=0)
    # transformers' 32 greedy tokens are gptjax's argmax at every step
    check_greedy(logits[2], len(prompt_ids), new)


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
    "quantized": (
        "mixtral",
        _edit_config(quantization_config={"quant_method": "gptq", "bits": 4}),
        "quantization_config.quant_method='gptq'",
    ),
    "jitter": ("mixtral", _edit_config(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    "shared_expert": (
        "qwen3_moe",
        _edit_config(shared_expert_intermediate_size=64),
        "shared_expert_intermediate_size=64",
    ),
    "no_moe_layer": (
        "qwen3_moe",
        _edit_config(mlp_only_layers=[0, 1]),
        "decoder_sparse_step=1 with mlp_only_layers=[0, 1] leaves no MoE layer",
    ),
    "mxfp4_half": (
        "gpt_oss",
        _edit_tensors(
            lambda t: t.update(
                {"model.layers.0.mlp.experts.down_proj_blocks": np.zeros((4, 64, 3, 16), np.uint8)}
            )
        ),
        "MXFP4 tensor layers.0.mlp.experts.down_proj_blocks has no",
    ),
}


@pytest.mark.parametrize("case", [*sorted(REFUSED), "moe_override"])
def test_fields_gptjax_cannot_compute_are_one_line(hf_dirs, tmp_path, capsys, case):
    """(moe_override: an imported mixture of experts keeps its shape and routing; only its
    training settings, e.g. model.moe.aux_loss, may be set at import.)"""
    kind, edit, message = REFUSED.get(case) or ("mixtral", None, "model.moe.top_k comes from")
    directory = tmp_path / "hf"
    shutil.copytree(hf_dirs[kind][0], directory)
    if edit is not None:
        edit(directory)
    run = tmp_path / "run"
    extra = ["model.moe.aux_loss=0.1", "model.moe.top_k=1"] if case == "moe_override" else []
    assert cli.main(["import", "hf", str(directory), "--run-dir", str(run), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), lines
    assert message in lines[0]
    assert not run.exists()


LLAMA = dict(
    norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, qkv_bias=False,
    attn_out_bias=False, mlp_bias=False, tie_embeddings=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "changes, asked, message",
    [
        (  # Qwen3 has qk-norm but no MLP biases
            dict(LLAMA, qk_norm=True, mlp_bias=True),
            [],
            "the nearest, llama, cannot compute model.qk_norm=True",
        ),
        (dict(mlp="relu2"), [], "cannot compute model.mlp='relu2'"),
        (dict(positions="none"), [], "model.positions=none"),
        (dict(logit_softcap=30.0), [], "model.logit_softcap=30.0: no Hugging Face"),
        (  # GPT-3 banded: GPT-2 has no bands, GPT-Neo no qkv bias and no score scale
            dict(attention_pattern=["dense", "local:256"]),
            [],
            "the nearest, gpt2, cannot compute model.attention_pattern=('dense', 'local:256')",
        ),
        (LLAMA, ["--model-type", "gpt2"], "the nearest, gpt2, cannot compute model.norm='rmsnorm'"),
        (LLAMA, ["--model-type", "bert"], "model_type='bert'; gptjax exports openai-gpt, gpt2"),
        (  # Mixtral's router has no bias (gpt-oss's has, with sinks and biased experts)
            dict(LLAMA, moe={"experts": 4, "router_bias": True}),
            [],
            "the nearest, mixtral, cannot compute model.moe.router_bias=True (it computes False)",
        ),
        (
            dict(LLAMA, moe={"experts": 4}),
            ["--model-type", "llama"],
            "llama, cannot compute model.moe (a mixture of experts; it has a dense MLP)",
        ),
    ],
    ids=[
        "qk_norm",
        "relu2",
        "no_positions",
        "softcap",
        "gpt3_banded",
        "asked_gpt2",
        "bert",
        "moe_router_bias",
        "moe_as_llama",
    ],
)
def test_export_refuses_a_model_no_family_computes(tmp_path, capsys, changes, asked, message):
    """Refused from the run's config.yaml, before any weight is read or anything written."""
    run = tmp_path / "run"
    run.mkdir()
    model = {**dict(n_layer=L, n_head=N, d_model=D), **changes}
    (run / "config.yaml").write_text(
        config.load(None, [f"model.{k}={json.dumps(v)}" for k, v in model.items()]).to_yaml()
    )
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out), *asked]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_mxfp4_dequantization_equals_transformers():
    """gptjax's NumPy MXFP4 decoding against transformers' own (convert_moe_packed_tensors) on
    random codes and exponents: the same f32 values, bit for bit (bf16 too: every value is an
    FP4 value times a power of two)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptjax.interop import mxfp4

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 10, 4), dtype=np.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    assert ours.shape == (3, 4 * 32, 10) and ours.dtype == np.float32
    b, sc = torch.from_numpy(blocks), torch.from_numpy(scales)
    np.testing.assert_array_equal(ours, convert_moe_packed_tensors(b, sc, dtype=torch.float32))
    np.testing.assert_array_equal(ours, convert_moe_packed_tensors(b, sc).float().numpy())


def test_gpt_oss_mxfp4_checkpoint_imports(hf_dirs, imported, tokenizer, tmp_path):
    """A gpt-oss directory as the Hub stores it: the experts' gate_up_proj and down_proj as
    MXFP4 `_blocks` + `_scales` (uint8) and a quantization_config. Imported, its logits are those
    of the transformers model holding transformers' own dequantization of the same bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    directory, theirs = hf_dirs["gpt_oss"]
    packed = tmp_path / "hf"
    shutil.copytree(directory, packed)
    path = packed / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    rng = np.random.default_rng(3)
    model = transformers.AutoModelForCausalLM.from_config(theirs.config).eval()
    model.load_state_dict(theirs.state_dict())
    E, F = 4, theirs.config.intermediate_size
    for i in range(L):
        for name, rows, cols in (("gate_up_proj", 2 * F, D), ("down_proj", D, F)):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(121, 125, (E, rows, cols // 32), dtype=np.uint8)
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            value = convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
            )
            with torch.no_grad():
                getattr(model.model.layers[i].mlp.experts, name).copy_(value)
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (packed / "config.json").write_text(json.dumps(config))
    # the import's own steps (config.json accepted, tensors read and dequantized), into the
    # block `gptjax import hf` made of the unpacked directory (its forward already compiled)
    hf_config_json, family = hf.read_config(packed)
    fixed, _ = hf.model_fields(hf_config_json, family, tokenizer.get_vocab_size())
    cfg = runs.read_config(imported["gpt_oss"]).model
    assert fixed["moe"]["experts"] == cfg.moe.experts and fixed["attention_sinks"]
    tensors = hf.read_tensors(packed, family.prefix)
    assert tensors["layers.0.mlp.experts.down_proj_blocks"].dtype == np.uint8
    params = hf.to_gptjax(tensors, cfg, hf_config_json["vocab_size"], family)
    prompt_ids = tokenizer.encode(PROMPT).ids
    ids = rows_and_greedy(tokenizer, prompt_ids, tokenizer.encode(TEXT[20:]).ids[:NEW])
    V = tokenizer.get_vocab_size()
    ours = np.asarray(FORWARD(model_module.abstract(cfg)[0], params, ids))[..., :V]
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=ATOL, rtol=0)
    assert np.abs(ours - hf_logits(theirs, ids)).max() > 0.1  # the packed experts are new
