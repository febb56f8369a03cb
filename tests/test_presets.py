"""Presets against their published figures: parameter counts from abstract shapes (nothing is
initialised), the block each paper describes, the Hugging Face model_type each exports as, and
GPT-3's banded option (configs/gpt3_*.yaml with model.attention_pattern=[dense,local:256])."""

import math
from pathlib import Path

import pytest

from gptjax import config
from gptjax.core import flops
from gptjax.interop import hf_families

ROOT = Path(__file__).resolve().parents[1]


def load(name, *overrides):
    return config.load(ROOT / "configs" / f"{name}.yaml", list(overrides))


def test_gpt1_is_the_paper():
    m = load("gpt1").model
    assert (m.n_layer, m.d_model, m.n_head, m.ff, m.seq_len) == (12, 768, 12, 3072, 512)
    assert (m.norm_placement, m.final_norm, m.positions, m.mlp) == (
        "post",
        False,
        "learned",
        "gelu_tanh",
    )
    assert m.vocab_size == 40576 and m.vocab_size % 128 == 0 and m.vocab_size - 128 < 40478
    params = flops.param_counts(m)["params"]
    assert params == pytest.approx(117e6, rel=0.005)  # the paper's "117M"
    # transformers' openai-gpt checkpoint has 116,534,784: the same less the 98 padding rows
    assert params - (m.vocab_size - 40478) * m.d_model == 116_534_784
    assert hf_families.family_of_model(m).model_type == "openai-gpt"


def test_llama_presets():
    m = load("llama3_1b").model
    # meta-llama/Llama-3.2-1B's config: 16 x 2048, 32 heads / 8 kv heads of 64, 8192 SwiGLU
    assert (m.n_layer, m.d_model, m.n_head, m.kv_heads, m.head_dim, m.ff) == (
        16, 2048, 32, 8, 64, 8192,
    )  # fmt: skip
    assert (m.vocab_size, m.tie_embeddings, m.rope_theta) == (128256, True, 500000.0)
    assert m.rope_scaling.type == "llama3" and m.rope_scaling.factor == 32.0
    # its safetensors hold 1,235,814,400 parameters (Meta: "1.23B")
    assert flops.param_counts(m)["params"] == 1_235_814_400
    assert hf_families.family_of_model(m).model_type == "llama"

    small = load("llama3_125m").model
    assert flops.param_counts(small)["params"] == pytest.approx(125e6, rel=0.01)
    assert small.ff * 3 == 2 * 4 * small.d_model  # SwiGLU at 8/3: GPT's MLP parameters
    assert hf_families.family_of_model(small).model_type == "llama"
    tiny = load("debug_llama").model
    assert tiny.kv_heads < tiny.n_head and hf_families.family_of_model(tiny).model_type == "llama"


@pytest.mark.parametrize("name", ["125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b", "175b"])
def test_gpt3_banded_option(name):
    """Alternating dense and 256-token banded layers: no parameter changes, and the attention
    term of the FLOPs counts the band (T - 256 fewer keys per query in half the layers)."""
    dense = load(f"gpt3_{name}").model
    banded = load(f"gpt3_{name}", "model.attention_pattern=[dense,local:256]").model
    assert banded.windows()[:4] == [None, 256, None, 256]
    assert flops.param_counts(banded) == flops.param_counts(dense)
    T, heads = dense.seq_len, dense.n_head * dense.head_dim
    saved = 12 * heads * (dense.n_layer // 2) * (T - 256)
    assert flops.flops_per_token(dense) - flops.flops_per_token(banded) == saved


@pytest.mark.parametrize(
    "name,model_type",
    [("gpt1", "openai-gpt"), ("gpt_neo", "gpt_neo"), ("mistral", "mistral"), ("qwen2", "qwen2")],
)
def test_tiny_family_configs_train(name, model_type, tmp_path):
    """configs/debug_FAMILY.yaml: the family's block (the Hugging Face model_type that computes
    it) takes train steps on one CPU device with a falling, finite loss (the step alone, on
    test_sharding's batches: debug_llama trains in tests/test_sharding_llama.py)."""
    import jax

    from gptjax.core import steps
    from gptjax.data.batching import from_windows
    from gptjax.tools import plan
    from tests.test_sharding import batches

    cfg = load(f"debug_{name}", f"run_dir={tmp_path}", "optim.warmup_steps=0")
    assert hf_families.family_of_model(cfg.model).model_type == model_type
    setup = steps.build(cfg, jax.devices()[:1])
    state, step = steps.init_state(setup), plan.compile_step(setup)
    losses = []
    for tokens in batches():
        state, stats = step(state, jax.device_put(from_windows(tokens, 0), setup.batch_shardings))
        losses.append(float(stats["loss"]))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1
