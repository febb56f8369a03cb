"""The Hugging Face families gptjax imports and exports, one table each: openai-gpt (GPT-1),
gpt2, gpt_neo, llama, mistral, qwen2 and qwen3.

A `Family` says three things, read by both directions in gptjax/interop/hf.py:
- `fields(hf)`: the gptjax model fields a config.json means (import). A field whose value gptjax
  does not compute (another activation, another RoPE type, a non-repeating layer pattern) raises
  `InteropError` naming it, in one line.
- `mismatches(model)` / `config(model, ...)`: which gptjax models the family can hold (each
  option it cannot, in words) and the config.json of one it can (export).
- `tensors(model)`: every HF tensor of the model and the gptjax parameter (or the slice of one)
  it is. HF shapes are written in symbols: V vocabulary, P positions, D d_model, F d_ff,
  H head_dim, Q = n_head · head_dim, KV = n_kv_head · head_dim. `linear`: an `nn.Linear`
  weight, stored [out, in] (transposed against gptjax's [in, out]); GPT-1 and GPT-2's `Conv1D`
  weights are [in, out] already. `part` (axis, index): the tensor is one slice of a fused
  gptjax weight (q, k or v of `qkv_w` [D, 3, N, H], k or v of `kv_w` [D, 2, K, H]), the axis
  counted without the leading layers axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptjax.config import ModelConfig, window_of
from gptjax.interop import InteropError, mxfp4


@dataclass(frozen=True)
class Tensor:
    hf: str  # under the family's prefix ("{i}": the layer), except the top-level lm_head
    ours: str  # the gptjax parameter ("blocks.*" are stacked on a leading layers axis)
    shape: tuple[str, ...]
    linear: bool = False
    part: tuple[int, int] | None = None
    layers: str = "all"  # per-layer rows: on every layer, or only the "dense" or "moe" ones
    hf_slice: tuple[int, int, int] | None = None  # (axis, start, step) of the HF tensor

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf


LM_HEAD = "lm_head.weight"  # never under the prefix

# gptjax mlp <-> the activation names of config.json (the first is what export writes)
GELU_NAMES = {"gelu_tanh": ("gelu_new", "gelu_pytorch_tanh"), "gelu": ("gelu",)}


def gelu_mlp(value: Any, name: str) -> str:
    for mlp, names in GELU_NAMES.items():
        if value in names:
            return mlp
    accepted = [name for names in GELU_NAMES.values() for name in names]
    allowed = " or ".join(map(repr, accepted))
    raise InteropError(f"config.json: {name}={value!r}; gptjax computes only {allowed}")


def positive_int(hf: dict, name: str, default: Any = None) -> int:
    value = hf.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InteropError(f"config.json: {name}={value!r} is not a positive integer")
    return value


def fixed(hf: dict, name: str, accepted: tuple, default: Any) -> None:
    """Refuse a config.json field whose value gptjax does not compute (absent: `default`)."""
    value = hf.get(name, default)
    if value not in accepted:
        allowed = " or ".join(map(repr, accepted))
        raise InteropError(f"config.json: {name}={value!r}; gptjax computes only {allowed}")


def repeating_pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest gptjax attention_pattern that, repeated, gives the per-layer `kinds` (at
    worst all of them: a pattern as long as the model, which gptjax runs unrolled)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return tuple(kinds[:p])
    raise AssertionError("unreachable: the whole list repeats once")


def _need(problems: list[str], ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


def _model_problems(model: ModelConfig, want: dict[str, Any]) -> list[str]:
    """Each gptjax field of `model` whose value differs from what the family computes (a
    mixture of experts, model.moe, only where `want` has "moe": True)."""
    out, want = [], dict(want)
    moe = want.pop("moe", False)
    if moe and model.moe is None:
        out.append("a dense MLP (it has a mixture of experts: set model.moe)")
    elif not moe and model.moe is not None:
        out.append("model.moe (a mixture of experts; it has a dense MLP)")
    for name, value in want.items():
        have = getattr(model, name)
        if isinstance(value, tuple) and name != "attention_pattern":
            if have not in value:
                out.append(f"model.{name}={have!r} (it computes {' or '.join(map(repr, value))})")
        elif have != value:
            out.append(f"model.{name}={have!r} (it computes {value!r})")
    return out


def _window(model: ModelConfig) -> int | None:
    """The one window of the model's local layers (None: all dense); several: -1."""
    windows = {w for w in model.windows() if w is not None}
    if len(windows) > 1:
        return -1
    return windows.pop() if windows else None


@dataclass(frozen=True)
class Family:
    model_type: str
    architectures: tuple[str, ...]  # the first is what export writes
    prefix: str
    fields: Callable[[dict], dict]
    mismatches: Callable[[ModelConfig], list[str]]
    config: Callable[[ModelConfig], dict]
    tensors: Callable[[ModelConfig], list[Tensor]]
    buffers: tuple[str, ...] = ()  # saved non-weights (causal masks, RoPE tables): skipped
    unpack: Callable[[dict], dict] | None = None  # packed tensors -> plain ones (gpt-oss MXFP4)

    def embedding(self) -> str:
        return next(t.hf for t in self.tensors(ModelConfig()) if t.ours == "wte")


# --- GPT-1 and GPT-2: Conv1D weights, c_attn fused q | k | v ------------------------------------

_LEARNED_LN = dict(
    norm="layernorm", positions="learned", qk_norm=False, attention_sinks=False, embed_scale=1.0
)


def _gpt_tensors(model: ModelConfig, final_norm: bool) -> list[Tensor]:
    rows = [
        Tensor("h.{i}.ln_1.weight", "blocks.ln1_scale", ("D",)),
        Tensor("h.{i}.ln_1.bias", "blocks.ln1_bias", ("D",)),
        Tensor("h.{i}.attn.c_attn.weight", "blocks.qkv_w", ("D", "3Q")),
        Tensor("h.{i}.attn.c_attn.bias", "blocks.qkv_b", ("3Q",)),
        Tensor("h.{i}.attn.c_proj.weight", "blocks.out_w", ("Q", "D")),
        Tensor("h.{i}.attn.c_proj.bias", "blocks.out_b", ("D",)),
        Tensor("h.{i}.ln_2.weight", "blocks.ln2_scale", ("D",)),
        Tensor("h.{i}.ln_2.bias", "blocks.ln2_bias", ("D",)),
        Tensor("h.{i}.mlp.c_fc.weight", "blocks.fc_w", ("D", "F")),
        Tensor("h.{i}.mlp.c_fc.bias", "blocks.fc_b", ("F",)),
        Tensor("h.{i}.mlp.c_proj.weight", "blocks.proj_w", ("F", "D")),
        Tensor("h.{i}.mlp.c_proj.bias", "blocks.proj_b", ("D",)),
    ]
    if final_norm:
        rows.append(Tensor("ln_f.weight", "ln_f_scale", ("D",)))
        rows.append(Tensor("ln_f.bias", "ln_f_bias", ("D",)))
    if not model.tie_embeddings:
        rows.append(Tensor(LM_HEAD, "lm_head", ("V", "D"), linear=True))
    return rows


def _gpt2_tensors(model: ModelConfig) -> list[Tensor]:
    embed = [Tensor("wte.weight", "wte", ("V", "D")), Tensor("wpe.weight", "wpe", ("P", "D"))]
    return embed + _gpt_tensors(model, final_norm=True)


def _openai_tensors(model: ModelConfig) -> list[Tensor]:
    embed = [
        Tensor("tokens_embed.weight", "wte", ("V", "D")),
        Tensor("positions_embed.weight", "wpe", ("P", "D")),
    ]
    return embed + _gpt_tensors(model, final_norm=False)


def _gpt2_fields(hf: dict) -> dict:
    for name in ("n_layer", "n_head", "n_embd", "n_positions"):
        positive_int(hf, name)
    fixed(hf, "scale_attn_weights", (True,), True)
    fixed(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    fixed(hf, "add_cross_attention", (False,), False)
    d_ff = hf.get("n_inner")
    return {
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "d_model": hf["n_embd"],
        "max_positions": hf["n_positions"],
        "d_ff": None if d_ff is None else positive_int(hf, "n_inner"),
        "mlp": gelu_mlp(hf.get("activation_function", "gelu_new"), "activation_function"),
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _openai_fields(hf: dict) -> dict:
    for name in ("n_layer", "n_head", "n_embd", "n_positions"):
        positive_int(hf, name)
    # transformers' OpenAIGPT: afn "gelu" is its gelu_new (the tanh form, as the original code)
    fixed(hf, "afn", ("gelu", "gelu_new"), "gelu")
    return {
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "d_model": hf["n_embd"],
        "max_positions": hf["n_positions"],
        "d_ff": None,
        "mlp": "gelu_tanh",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "norm_placement": "post",
        "final_norm": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _gpt_shape_problems(model: ModelConfig, problems: list[str]) -> None:
    _need(
        problems,
        model.kv_heads == model.n_head,
        f"model.n_kv_head={model.n_kv_head} (it has one key/value head per query head)",
    )
    _need(
        problems,
        model.head_dim * model.n_head == model.d_model,
        f"model.head_dim={model.head_dim} (it computes d_model / n_head)",
    )


def _gpt2_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(
        model,
        {
            **_LEARNED_LN,
            "norm_placement": "pre",
            "final_norm": True,
            "qkv_bias": True,
            "attn_out_bias": True,
            "mlp_bias": True,
            "attention_pattern": ("dense",),
            "attention_scale": None,
            "mlp": ("gelu_tanh", "gelu"),
        },
    )
    _gpt_shape_problems(model, problems)
    return problems


def _openai_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(
        model,
        {
            **_LEARNED_LN,
            "norm_placement": "post",
            "final_norm": False,
            "qkv_bias": True,
            "attn_out_bias": True,
            "mlp_bias": True,
            "attention_pattern": ("dense",),
            "attention_scale": None,
            "mlp": "gelu_tanh",
        },
    )
    _gpt_shape_problems(model, problems)
    four = model.ff == 4 * model.d_model
    _need(problems, four, f"model.d_ff={model.ff} (it computes 4 · d_model)")
    return problems


def _common(model: ModelConfig) -> dict:
    return {"bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": model.tie_embeddings}


def _gpt2_config(model: ModelConfig) -> dict:
    return {
        **_common(model),
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_embd": model.d_model,
        "n_positions": model.n_positions,
        "n_ctx": model.n_positions,
        "n_inner": model.ff,
        "activation_function": GELU_NAMES[model.mlp][0],
        "layer_norm_epsilon": model.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
        "embd_pdrop": model.dropout,
        "resid_pdrop": model.dropout,
        "attn_pdrop": 0.0,
    }


def _openai_config(model: ModelConfig) -> dict:
    return {
        **_common(model),
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_embd": model.d_model,
        "n_positions": model.n_positions,
        "afn": "gelu",  # transformers' OpenAIGPT "gelu" is the tanh form
        "layer_norm_epsilon": model.norm_eps,
        "embd_pdrop": model.dropout,
        "resid_pdrop": model.dropout,
        "attn_pdrop": 0.0,
    }


# --- GPT-Neo: Linear q, k, v (no bias), unscaled scores, global / local layers ------------------


def _separate_qkv(model: ModelConfig, stem: str, bias: bool) -> list[Tensor]:
    """q, k, v as three Linear tensors `{stem}{q,k,v}_proj.*` against gptjax's fused qkv_w
    (K = N) or q_w + kv_w (grouped heads)."""
    fused = model.kv_heads == model.n_head
    rows = []
    for j, name in enumerate("qkv"):
        size = "Q" if name == "q" else "KV"
        if fused:
            w, b, wpart, bpart = "blocks.qkv_w", "blocks.qkv_b", (1, j), (0, j)
        elif name == "q":
            w, b, wpart, bpart = "blocks.q_w", "blocks.q_b", None, None
        else:
            w, b, wpart, bpart = "blocks.kv_w", "blocks.kv_b", (1, j - 1), (0, j - 1)
        rows.append(Tensor(f"{stem}{name}_proj.weight", w, (size, "D"), linear=True, part=wpart))
        if bias:
            rows.append(Tensor(f"{stem}{name}_proj.bias", b, (size,), part=bpart))
    return rows


def _neo_tensors(model: ModelConfig) -> list[Tensor]:
    a = "h.{i}.attn.attention."
    rows = [
        Tensor("wte.weight", "wte", ("V", "D")),
        Tensor("wpe.weight", "wpe", ("P", "D")),
        Tensor("h.{i}.ln_1.weight", "blocks.ln1_scale", ("D",)),
        Tensor("h.{i}.ln_1.bias", "blocks.ln1_bias", ("D",)),
        *_separate_qkv(model, a, bias=False),
        Tensor(a + "out_proj.weight", "blocks.out_w", ("D", "Q"), linear=True),
        Tensor(a + "out_proj.bias", "blocks.out_b", ("D",)),
        Tensor("h.{i}.ln_2.weight", "blocks.ln2_scale", ("D",)),
        Tensor("h.{i}.ln_2.bias", "blocks.ln2_bias", ("D",)),
        Tensor("h.{i}.mlp.c_fc.weight", "blocks.fc_w", ("F", "D"), linear=True),
        Tensor("h.{i}.mlp.c_fc.bias", "blocks.fc_b", ("F",)),
        Tensor("h.{i}.mlp.c_proj.weight", "blocks.proj_w", ("D", "F"), linear=True),
        Tensor("h.{i}.mlp.c_proj.bias", "blocks.proj_b", ("D",)),
        Tensor("ln_f.weight", "ln_f_scale", ("D",)),
        Tensor("ln_f.bias", "ln_f_bias", ("D",)),
    ]
    if not model.tie_embeddings:
        rows.append(Tensor(LM_HEAD, "lm_head", ("V", "D"), linear=True))
    return rows


def _neo_fields(hf: dict) -> dict:
    n_layer = positive_int(hf, "num_layers")
    for name in ("num_heads", "hidden_size", "max_position_embeddings"):
        positive_int(hf, name)
    window = positive_int(hf, "window_size", 256)
    types = hf.get("attention_types", [[["global", "local"], 12]])
    try:
        layers = [kind for kinds, repeat in types for _ in range(repeat) for kind in kinds]
    except (TypeError, ValueError):
        raise InteropError(
            f"config.json: attention_types={types!r} is not [[kinds, n], ...]"
        ) from None
    other = sorted({kind for kind in layers if kind not in ("global", "local")})
    if other:
        raise InteropError(
            f"config.json: attention_types has {other[0]!r}; gptjax computes global, local"
        )
    if len(layers) != n_layer:
        raise InteropError(
            f"config.json: attention_types gives {len(layers)} layers; num_layers={n_layer}"
        )
    kinds = ["dense" if kind == "global" else f"local:{window}" for kind in layers]
    d_ff = hf.get("intermediate_size")
    return {
        "n_layer": n_layer,
        "n_head": hf["num_heads"],
        "d_model": hf["hidden_size"],
        "max_positions": hf["max_position_embeddings"],
        "d_ff": None if d_ff is None else positive_int(hf, "intermediate_size"),
        "mlp": gelu_mlp(hf.get("activation_function", "gelu_new"), "activation_function"),
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "qkv_bias": False,
        "attention_scale": 1.0,
        "attention_pattern": repeating_pattern(kinds),
    }


def _neo_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(
        model,
        {
            **_LEARNED_LN,
            "norm_placement": "pre",
            "final_norm": True,
            "qkv_bias": False,
            "attn_out_bias": True,
            "mlp_bias": True,
            "attention_scale": 1.0,
            "mlp": ("gelu_tanh", "gelu"),
        },
    )
    _gpt_shape_problems(model, problems)
    one = _window(model) != -1
    _need(problems, one, "local layers of different windows (it has one window_size)")
    return problems


def _neo_config(model: ModelConfig) -> dict:
    window = _window(model)
    kinds = ["global" if window_of(kind) is None else "local" for kind in model.attention_pattern]
    return {
        **_common(model),
        "num_layers": model.n_layer,
        "num_heads": model.n_head,
        "hidden_size": model.d_model,
        "max_position_embeddings": model.n_positions,
        "intermediate_size": model.ff,
        "attention_types": [[kinds, model.n_layer // len(kinds)]],
        "window_size": window or 256,
        "activation_function": GELU_NAMES[model.mlp][0],
        "layer_norm_epsilon": model.norm_eps,
        "embed_dropout": model.dropout,
        "resid_dropout": model.dropout,
        "attention_dropout": 0.0,
    }


# --- Llama, Mistral, Qwen2, Qwen3 (qk-norm): RMSNorm, RoPE, SwiGLU, grouped heads ----------


def _llama_tensors(model: ModelConfig, experts: tuple[Tensor, ...] = ()) -> list[Tensor]:
    """Llama's tensors (and Qwen3's q/k norms, gpt-oss's sinks); the dense MLP's on the dense
    layers, `experts` (a MoE family's router and experts) on the MoE layers."""
    a, m = "layers.{i}.self_attn.", "layers.{i}.mlp."
    rows = [
        Tensor("embed_tokens.weight", "wte", ("V", "D")),
        Tensor("layers.{i}.input_layernorm.weight", "blocks.ln1_scale", ("D",)),
        *_separate_qkv(model, a, bias=model.qkv_bias),
        Tensor(a + "o_proj.weight", "blocks.out_w", ("D", "Q"), linear=True),
    ]
    if model.attn_out_bias:
        rows.append(Tensor(a + "o_proj.bias", "blocks.out_b", ("D",)))
    if model.qk_norm:  # Qwen3: RMSNorm gains of each head's queries and keys
        rows.append(Tensor(a + "q_norm.weight", "blocks.q_norm", ("H",)))
        rows.append(Tensor(a + "k_norm.weight", "blocks.k_norm", ("H",)))
    if model.attention_sinks:  # gpt-oss: one logit per head
        rows.append(Tensor(a + "sinks", "blocks.sinks", ("N",)))
    rows.append(Tensor("layers.{i}.post_attention_layernorm.weight", "blocks.ln2_scale", ("D",)))
    for hf, ours, shape in (
        ("gate_proj", "gate", ("F", "D")),
        ("up_proj", "fc", ("F", "D")),
        ("down_proj", "proj", ("D", "F")),
    ):
        rows.append(
            Tensor(f"{m}{hf}.weight", f"blocks.{ours}_w", shape, linear=True, layers="dense")
        )
        if model.mlp_bias:
            rows.append(Tensor(f"{m}{hf}.bias", f"blocks.{ours}_b", shape[:1], layers="dense"))
    rows.extend(experts)
    rows.append(Tensor("norm.weight", "ln_f_scale", ("D",)))
    if not model.tie_embeddings:
        rows.append(Tensor(LM_HEAD, "lm_head", ("V", "D"), linear=True))
    return rows


ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "truncate",
        "attention_factor",
    },
}


def rope_fields(hf: dict) -> dict:
    """rope_theta and rope_scaling from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InteropError(f"config.json: rope_parameters={params!r} is not a mapping")
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InteropError(
            f"config.json: partial_rotary_factor={partial!r}; gptjax rotates whole heads only"
        )
    if kind not in ROPE_KEYS:
        allowed = ", ".join(ROPE_KEYS)
        raise InteropError(f"config.json: rope_type={kind!r}; gptjax computes {allowed}")
    extra = sorted(k for k, v in params.items() if k not in ROPE_KEYS[kind] and v is not None)
    if extra:
        raise InteropError(
            f"config.json: rope_parameters.{extra[0]}={params[extra[0]]!r} ({kind} RoPE in "
            "gptjax has no such setting)"
        )
    out: dict[str, Any] = {"positions": "rope", "rope_theta": float(theta), "rope_scaling": None}
    if kind == "default":
        return out
    scaling: dict[str, Any] = {"type": kind, "factor": float(params["factor"])}
    if kind in ("llama3", "yarn"):
        original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        scaling["original_max_position"] = int(original)
    if kind == "llama3":
        scaling["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        scaling["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
    if kind == "yarn":
        scaling["beta_fast"] = float(params.get("beta_fast") or 32)
        scaling["beta_slow"] = float(params.get("beta_slow") or 1)
        scaling["truncate"] = bool(params.get("truncate", True))
        if params.get("attention_factor") is not None:
            scaling["attention_factor"] = float(params["attention_factor"])
    out["rope_scaling"] = scaling
    return out


def rope_config(model: ModelConfig) -> dict:
    """rope_parameters (transformers 5) and the older rope_theta + rope_scaling alike."""
    s = model.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rope_theta}
    if s is not None:
        params.update(rope_type=s.type, factor=s.factor)
        if s.type in ("llama3", "yarn"):
            params["original_max_position_embeddings"] = s.original_max_position
        if s.type == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
            if s.attention_factor is not None:
                params["attention_factor"] = s.attention_factor
    legacy = None if s is None else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": model.rope_theta, "rope_scaling": legacy}


def _llama_common_fields(
    hf: dict, *, qkv_bias: bool, out_bias: bool, mlp_bias: bool, head_dim: int | None = None
) -> dict:
    """`head_dim`: the family's default when config.json has none (Qwen3: 128), else
    hidden_size / num_attention_heads."""
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"):
        positive_int(hf, name)
    positive_int(hf, "max_position_embeddings")
    fixed(hf, "hidden_act", ("silu",), "silu")
    n_head = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or n_head
    head_dim = hf.get("head_dim") or head_dim or hf["hidden_size"] // n_head
    return {
        "n_layer": hf["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": positive_int({"num_key_value_heads": kv}, "num_key_value_heads"),
        "head_dim": positive_int({"head_dim": head_dim}, "head_dim"),
        "d_model": hf["hidden_size"],
        "d_ff": hf["intermediate_size"],
        "max_positions": hf["max_position_embeddings"],
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "mlp": "swiglu",
        "qkv_bias": qkv_bias,
        "attn_out_bias": out_bias,
        "mlp_bias": mlp_bias,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **rope_fields(hf),
    }


def _llama_fields(hf: dict) -> dict:
    attention_bias = bool(hf.get("attention_bias", False))
    return _llama_common_fields(
        hf, qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias"))
    )


def _mistral_fields(hf: dict) -> dict:
    out = _llama_common_fields(hf, qkv_bias=False, out_bias=False, mlp_bias=False)
    window = hf.get("sliding_window")
    if window is not None:
        out["attention_pattern"] = (f"local:{positive_int(hf, 'sliding_window')}",)
    return out


def _qwen2_fields(hf: dict) -> dict:
    out = _llama_common_fields(hf, qkv_bias=True, out_bias=False, mlp_bias=False)
    out["attention_pattern"] = _qwen_layer_pattern(hf, out["n_layer"])
    return out


def _qwen3_fields(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", False))
    out = _llama_common_fields(hf, qkv_bias=bias, out_bias=bias, mlp_bias=False, head_dim=128)
    out["qk_norm"] = True
    out["attention_pattern"] = _qwen_layer_pattern(hf, out["n_layer"])
    return out


def _qwen_layer_pattern(hf: dict, n_layer: int) -> tuple[str, ...]:
    """Qwen2 and Qwen3's full / sliding layers (`layer_types`, or `use_sliding_window` +
    `max_window_layers`) as a gptjax attention_pattern."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        start = hf.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if window is not None and i >= start else "full_attention"
            for i in range(n_layer)
        ]
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other or len(layer_types) != n_layer:
        what = f"has {other[0]!r}" if other else f"lists {len(layer_types)} layers, not {n_layer}"
        raise InteropError(f"config.json: layer_types {what}")
    if window is not None:
        window = positive_int({"sliding_window": window}, "sliding_window")
    kinds = [
        "dense" if t == "full_attention" or window is None else f"local:{window}"
        for t in layer_types
    ]
    return repeating_pattern(kinds)


_ROPE_BLOCK = dict(
    norm="rmsnorm",
    norm_placement="pre",
    final_norm=True,
    positions="rope",
    qk_norm=False,
    attention_sinks=False,
    attention_scale=None,
    mlp="swiglu",
    embed_scale=1.0,
)


def _one_attention_bias(model: ModelConfig, problems: list[str]) -> None:
    """Llama-style configs have one attention_bias for q/k/v and the output projection."""
    _need(
        problems,
        model.qkv_bias == model.attn_out_bias,
        f"model.qkv_bias={model.qkv_bias} with model.attn_out_bias={model.attn_out_bias} "
        "(its attention_bias covers both)",
    )


def _one_window(model: ModelConfig, problems: list[str]) -> None:
    """Mistral-style configs have one sliding_window for every local layer."""
    _need(problems, _window(model) != -1, "local layers of different windows (one sliding_window)")


def _llama_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(model, {**_ROPE_BLOCK, "attention_pattern": ("dense",)})
    _one_attention_bias(model, problems)
    return problems


def _mistral_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(
        model, {**_ROPE_BLOCK, "qkv_bias": False, "attn_out_bias": False, "mlp_bias": False}
    )
    _need(
        problems,
        len(model.attention_pattern) == 1,
        f"model.attention_pattern={list(model.attention_pattern)} (every layer alike)",
    )
    return problems


def _qwen2_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(
        model, {**_ROPE_BLOCK, "qkv_bias": True, "attn_out_bias": False, "mlp_bias": False}
    )
    _one_window(model, problems)
    return problems


def _qwen3_mismatches(model: ModelConfig) -> list[str]:
    problems = _model_problems(model, {**_ROPE_BLOCK, "qk_norm": True, "mlp_bias": False})
    _one_attention_bias(model, problems)
    _one_window(model, problems)
    return problems


def _llama_common_config(model: ModelConfig) -> dict:
    return {
        **_common(model),
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_size": model.d_model,
        "intermediate_size": model.ff,
        "hidden_act": "silu",
        "max_position_embeddings": model.n_positions,
        "rms_norm_eps": model.norm_eps,
        "attention_dropout": 0.0,
        **rope_config(model),
    }


def _llama_config(model: ModelConfig) -> dict:
    return {
        **_llama_common_config(model),
        "attention_bias": model.qkv_bias,
        "mlp_bias": model.mlp_bias,
    }


def _mistral_config(model: ModelConfig) -> dict:
    return {**_llama_common_config(model), "sliding_window": _window(model)}


def _qwen3_config(model: ModelConfig) -> dict:
    return {**_qwen2_config(model), "attention_bias": model.qkv_bias}


def _qwen2_config(model: ModelConfig) -> dict:
    window = _window(model)
    types = ["full_attention" if w is None else "sliding_attention" for w in model.windows()]
    return {
        **_llama_common_config(model),
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": model.n_layer,  # unused: layer_types says it layer by layer
        "layer_types": types,
    }


GPT_BUFFERS = (".attn.bias", ".attn.masked_bias", "position_ids")
ROPE_BUFFERS = ("rotary_emb.inv_freq",)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "openai-gpt",
            ("OpenAIGPTLMHeadModel", "OpenAIGPTModel"),
            "transformer.",
            _openai_fields,
            _openai_mismatches,
            _openai_config,
            _openai_tensors,
            GPT_BUFFERS,
        ),
        Family(
            "gpt2",
            ("GPT2LMHeadModel", "GPT2Model"),
            "transformer.",
            _gpt2_fields,
            _gpt2_mismatches,
            _gpt2_config,
            _gpt2_tensors,
            GPT_BUFFERS,
        ),
        Family(
            "gpt_neo",
            ("GPTNeoForCausalLM", "GPTNeoModel"),
            "transformer.",
            _neo_fields,
            _neo_mismatches,
            _neo_config,
            _neo_tensors,
            (".attn.attention.bias", ".attn.attention.masked_bias"),
        ),
        Family(
            "llama",
            ("LlamaForCausalLM", "LlamaModel"),
            "model.",
            _llama_fields,
            _llama_mismatches,
            _llama_config,
            _llama_tensors,
            ROPE_BUFFERS,
        ),
        Family(
            "mistral",
            ("MistralForCausalLM", "MistralModel"),
            "model.",
            _mistral_fields,
            _mistral_mismatches,
            _mistral_config,
            _llama_tensors,
            ROPE_BUFFERS,
        ),
        Family(
            "qwen2",
            ("Qwen2ForCausalLM", "Qwen2Model"),
            "model.",
            _qwen2_fields,
            _qwen2_mismatches,
            _qwen2_config,
            _llama_tensors,
            ROPE_BUFFERS,
        ),
        Family(
            "qwen3",
            ("Qwen3ForCausalLM", "Qwen3Model"),
            "model.",
            _qwen3_fields,
            _qwen3_mismatches,
            _qwen3_config,
            _llama_tensors,
            ROPE_BUFFERS,
        ),
    )
}


def family_of_config(hf: dict, where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise InteropError(
            f"{where}: model_type={model_type!r}; gptjax imports {', '.join(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    other = [a for a in hf.get("architectures") or [] if a not in family.architectures]
    if other:
        raise InteropError(
            f"{where}: architectures={other}; gptjax imports {model_type} as "
            f"{list(family.architectures)}"
        )
    return family


def family_of_model(model: ModelConfig, model_type: str | None = None) -> Family:
    """The family that computes `model` (or the one asked for); one line naming what stands in
    the way when none does."""
    if model.positions == "none":
        raise InteropError(
            "model.positions=none: no Hugging Face model_type gptjax exports computes a model "
            "without positions"
        )
    if model.logit_softcap:
        raise InteropError(
            f"model.logit_softcap={model.logit_softcap}: no Hugging Face model_type gptjax "
            "exports caps its logits"
        )
    if model_type is not None:
        if model_type not in FAMILIES:
            raise InteropError(f"model_type={model_type!r}; gptjax exports {', '.join(FAMILIES)}")
        candidates = [FAMILIES[model_type]]
    else:
        candidates = list(FAMILIES.values())
    problems = {f.model_type: f.mismatches(model) for f in candidates}
    for f in candidates:
        if not problems[f.model_type]:
            return f
    # the nearest: the fewest problems, a family with experts first for a model with them
    moe = {f.model_type for f in MOE_FAMILIES}
    kind = lambda name: (name in moe) != (model.moe is not None)
    nearest = min(problems, key=lambda name: (len(problems[name]), kind(name)))
    listed = problems[nearest]
    more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
    raise InteropError(
        f"no Hugging Face model_type computes this model; the nearest, {nearest}, cannot "
        f"compute {listed[0]}{more}"
    )


def moe_layers(model: ModelConfig) -> tuple[bool, ...]:
    """Whether each layer's MLP is the mixture of experts (model.moe)."""
    return model.moe_layers()


def dims(model: ModelConfig, vocab: int) -> dict[str, int]:
    Q, KV = model.n_head * model.head_dim, model.kv_heads * model.head_dim
    E = model.moe.experts if model.moe is not None else 0
    return {"V": vocab, "P": model.n_positions, "D": model.d_model, "F": model.ff, "Q": Q,
            "KV": KV, "3Q": 3 * Q, "H": model.head_dim, "N": model.n_head, "E": E,
            "M": model.expert_ff, "2M": 2 * model.expert_ff}  # fmt: skip


# --- Mixture of experts: Mixtral, Qwen3-MoE, gpt-oss -------------------------------------------
#
# gptjax's MoE MLP (model.moe, gptjax/core/moe.py): router_w [D, E] (+ router_b), and per expert
# gate, up [D, M] and down [M, D] (+ biases), stacked over the MoE layers. Mixtral and Qwen3-MoE
# checkpoints store one Linear per expert (`experts.{j}.w1` ..., the names transformers'
# save_pretrained writes back and the Hub's); gpt-oss stores the experts fused per layer,
# gate_up_proj [E, D, 2M] with the gate and up columns interleaved (gate 0::2, up 1::2), and
# down_proj [E, M, D], not transposed (on the Hub MXFP4-packed: dequantized on import).


def _experts(hf: dict, *names: str) -> int:
    for name in names:
        if name in hf:
            return positive_int(hf, name)
    return positive_int(hf, names[0])


def _float(hf: dict, name: str, default: float, minimum: float = 0.0) -> float:
    value = hf.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise InteropError(f"config.json: {name}={value!r} is not a number >= {minimum}")
    return float(value)


def _moe_fields(hf: dict, experts: int, **fields: Any) -> dict:
    """model.moe of a MoE config.json: `experts`, num_experts_per_tok, the load-balancing
    coefficient router_aux_loss_coef (transformers has no router z-loss: 0)."""
    top_k = positive_int(hf, "num_experts_per_tok")
    if top_k > experts:
        raise InteropError(f"config.json: num_experts_per_tok={top_k} exceeds {experts} experts")
    aux = _float(hf, "router_aux_loss_coef", 0.001)
    return {"experts": experts, "top_k": top_k, "aux_loss": aux, "z_loss": 0.0, **fields}


def _moe_problems(model: ModelConfig, problems: list[str], want: dict[str, Any]) -> None:
    """Each model.moe field whose value differs from what the family computes (a tuple: any)."""
    if model.moe is None:
        return
    for name, value in want.items():
        have = getattr(model.moe, name)
        if have not in (value if isinstance(value, tuple) else (value,)):
            what = " or ".join(map(repr, value)) if isinstance(value, tuple) else repr(value)
            problems.append(f"model.moe.{name}={have!r} (it computes {what})")


def _all_moe(model: ModelConfig, problems: list[str]) -> None:
    if model.moe is not None and not all(model.moe_layers()):
        dense = [i for i, m in enumerate(model.moe_layers()) if not m]
        problems.append(f"dense MLP layers {dense} (every layer is a mixture of experts)")


def _topk_softmax(model: ModelConfig) -> bool:
    """Whether the gates are a softmax over the k chosen logits (softmax over all then the
    top k renormalised is the same)."""
    moe = model.moe
    return moe.gating == "topk_softmax" or moe.renormalize


# Mixtral: Mistral's attention, every layer a mixture of experts (block_sparse_moe)


def _mixtral_experts(model: ModelConfig) -> tuple[Tensor, ...]:
    s = "layers.{i}.block_sparse_moe."
    return (
        Tensor(s + "gate.weight", "blocks.router_w", ("E", "D"), linear=True, layers="moe"),
        Tensor(s + "experts.{j}.w1.weight", "blocks.expert_gate_w", ("M", "D"), True, layers="moe"),
        Tensor(s + "experts.{j}.w3.weight", "blocks.expert_up_w", ("M", "D"), True, layers="moe"),
        Tensor(s + "experts.{j}.w2.weight", "blocks.expert_down_w", ("D", "M"), True, layers="moe"),
    )


def _mixtral_fields(hf: dict) -> dict:
    out = _mistral_fields(hf)
    jitter = _float(hf, "router_jitter_noise", 0.0)
    if jitter:
        raise InteropError(
            f"config.json: router_jitter_noise={jitter!r}; gptjax's router has no jitter (0.0)"
        )
    experts = _experts(hf, "num_local_experts", "num_experts")
    out["moe"] = _moe_fields(hf, experts, gating="topk_softmax")
    return out


def _mixtral_mismatches(model: ModelConfig) -> list[str]:
    want = {**_ROPE_BLOCK, "qkv_bias": False, "attn_out_bias": False, "moe": True}
    problems = _model_problems(model, {**want, "mlp_bias": (False, True)})  # no dense MLP
    _need(
        problems,
        len(model.attention_pattern) == 1,
        f"model.attention_pattern={list(model.attention_pattern)} (every layer alike)",
    )
    if model.moe is None:
        return problems
    _all_moe(model, problems)
    _moe_problems(
        model, problems, {"router_bias": False, "expert_bias": False, "activation": "swiglu"}
    )
    if not _topk_softmax(model):
        problems.append("model.moe.renormalize=False (its gates are renormalised)")
    return problems


def _moe_config(model: ModelConfig) -> dict:
    return {
        "num_experts_per_tok": model.moe.top_k,
        "router_aux_loss_coef": model.moe.aux_loss,
        "output_router_logits": False,
    }


def _mixtral_config(model: ModelConfig) -> dict:
    return {
        **_mistral_config(model),
        "intermediate_size": model.expert_ff,
        **_moe_config(model),
        "num_local_experts": model.moe.experts,
        "router_jitter_noise": 0.0,
    }


# Qwen3-MoE: Qwen3's attention; MoE layers where (l + 1) % decoder_sparse_step == 0 and l is not
# in mlp_only_layers (the others Qwen3's dense MLP of intermediate_size)


def _qwen3_moe_experts(model: ModelConfig) -> tuple[Tensor, ...]:
    s = "layers.{i}.mlp."
    return (
        Tensor(s + "gate.weight", "blocks.router_w", ("E", "D"), linear=True, layers="moe"),
        *(
            Tensor(
                f"{s}experts.{{j}}.{hf}.weight",
                f"blocks.expert_{ours}_w",
                shape,
                True,
                layers="moe",
            )  # fmt: skip
            for hf, ours, shape in (
                ("gate_proj", "gate", ("M", "D")),
                ("up_proj", "up", ("M", "D")),
                ("down_proj", "down", ("D", "M")),
            )
        ),
    )


def _qwen3_moe_fields(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", False))
    out = _llama_common_fields(hf, qkv_bias=bias, out_bias=bias, mlp_bias=False)
    out["qk_norm"] = True
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is not None:  # every layer alike
        out["attention_pattern"] = (f"local:{positive_int(hf, 'sliding_window')}",)
    shared = hf.get("shared_expert_intermediate_size")
    if shared:
        raise InteropError(
            f"config.json: shared_expert_intermediate_size={shared!r}; gptjax's MoE has no "
            "shared expert"
        )
    dense = hf.get("mlp_only_layers") or []
    n_layer = out["n_layer"]
    if not isinstance(dense, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layer for i in dense
    ):
        raise InteropError(f"config.json: mlp_only_layers={dense!r} is not a list of layers")
    every = positive_int(hf, "decoder_sparse_step", 1)
    if not any((i + 1) % every == 0 and i not in dense for i in range(n_layer)):
        raise InteropError(
            f"config.json: decoder_sparse_step={every} with mlp_only_layers={dense} leaves no "
            "MoE layer (import it as qwen3)"
        )
    out["moe"] = _moe_fields(
        hf,
        _experts(hf, "num_experts", "num_local_experts"),
        d_ff=positive_int(hf, "moe_intermediate_size"),
        every=every,
        dense_layers=tuple(sorted(set(dense))),
        gating="softmax_topk",
        renormalize=bool(hf.get("norm_topk_prob", False)),
    )
    return out


def _qwen3_moe_mismatches(model: ModelConfig) -> list[str]:
    want = {**_ROPE_BLOCK, "qk_norm": True, "mlp_bias": False, "moe": True}
    problems = _model_problems(model, want)
    _one_attention_bias(model, problems)
    _need(
        problems,
        len(model.attention_pattern) == 1,
        f"model.attention_pattern={list(model.attention_pattern)} (every layer alike)",
    )
    _moe_problems(
        model, problems, {"router_bias": False, "expert_bias": False, "activation": "swiglu"}
    )
    return problems


def _qwen3_moe_config(model: ModelConfig) -> dict:
    window = _window(model)
    moe = model.moe
    softmax_first = moe.gating == "softmax_topk"
    return {
        **_llama_common_config(model),
        **_moe_config(model),
        "attention_bias": model.qkv_bias,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "num_experts": moe.experts,
        "moe_intermediate_size": model.expert_ff,
        "decoder_sparse_step": moe.every,
        "mlp_only_layers": list(moe.dense_layers),
        # a softmax over the k chosen logits is the renormalised top k of the softmax
        "norm_topk_prob": moe.renormalize or not softmax_first,
    }


# gpt-oss: sinks, alternating sliding / full layers, YaRN, attention biases, clamped SwiGLU
# experts with biases, a router with a bias (softmax over the k chosen logits)

GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}  # fmt: skip  (transformers' GptOssConfig default)


def _gpt_oss_experts(model: ModelConfig) -> tuple[Tensor, ...]:
    s = "layers.{i}.mlp."
    moe = dict(layers="moe")
    gate, up = dict(hf_slice=(-1, 0, 2), **moe), dict(hf_slice=(-1, 1, 2), **moe)
    return (
        Tensor(s + "router.weight", "blocks.router_w", ("E", "D"), linear=True, **moe),
        Tensor(s + "router.bias", "blocks.router_b", ("E",), **moe),
        Tensor(s + "experts.gate_up_proj", "blocks.expert_gate_w", ("E", "D", "2M"), **gate),
        Tensor(s + "experts.gate_up_proj", "blocks.expert_up_w", ("E", "D", "2M"), **up),
        Tensor(s + "experts.gate_up_proj_bias", "blocks.expert_gate_b", ("E", "2M"), **gate),
        Tensor(s + "experts.gate_up_proj_bias", "blocks.expert_up_b", ("E", "2M"), **up),
        Tensor(s + "experts.down_proj", "blocks.expert_down_w", ("E", "M", "D"), **moe),
        Tensor(s + "experts.down_proj_bias", "blocks.expert_down_b", ("E", "D"), **moe),
    )


def _gpt_oss_fields(hf: dict) -> dict:
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        hf = {**hf, "rope_parameters": {**GPT_OSS_ROPE, "rope_theta": hf.get("rope_theta", 1.5e5)}}
    bias = bool(hf.get("attention_bias", True))
    out = _llama_common_fields(hf, qkv_bias=bias, out_bias=bias, mlp_bias=False, head_dim=64)
    out["norm_eps"] = float(hf.get("rms_norm_eps", 1e-5))
    n_layer = out["n_layer"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' default: sliding, full, sliding, ...
        layer_types = ["sliding_attention", "full_attention"] * (n_layer // 2) + [
            "sliding_attention"
        ] * (n_layer % 2)
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other or len(layer_types) != n_layer:
        what = f"has {other[0]!r}" if other else f"lists {len(layer_types)} layers, not {n_layer}"
        raise InteropError(f"config.json: layer_types {what}")
    window = hf.get("sliding_window", 128)
    if window is not None:
        window = positive_int({"sliding_window": window}, "sliding_window")
    kinds = [
        "dense" if t == "full_attention" or window is None else f"local:{window}"
        for t in layer_types
    ]
    out["attention_pattern"] = repeating_pattern(kinds)
    out["attention_sinks"] = True
    experts = _experts(hf, "num_local_experts", "num_experts")
    out["moe"] = _moe_fields(
        hf,
        experts,
        router_bias=True,
        expert_bias=True,
        activation="swiglu_clamped",
        limit=_float(hf, "swiglu_limit", 7.0, minimum=1e-9),
        alpha=_float(hf, "swiglu_alpha", 1.702, minimum=1e-9),
        gating="topk_softmax",
    )
    return out


def _gpt_oss_mismatches(model: ModelConfig) -> list[str]:
    want = {**_ROPE_BLOCK, "attention_sinks": True, "mlp_bias": (False, True), "moe": True}
    problems = _model_problems(model, want)
    _one_attention_bias(model, problems)
    _one_window(model, problems)
    _all_moe(model, problems)
    _moe_problems(
        model, problems, {"router_bias": True, "expert_bias": True, "activation": "swiglu_clamped"}
    )
    if model.moe is not None and not _topk_softmax(model):
        problems.append("model.moe.renormalize=False (its gates are a softmax over the k chosen)")
    return problems


def _gpt_oss_config(model: ModelConfig) -> dict:
    window = _window(model)
    types = ["full_attention" if w is None else "sliding_attention" for w in model.windows()]
    return {
        **_llama_common_config(model),
        **_moe_config(model),
        "intermediate_size": model.expert_ff,
        "attention_bias": model.qkv_bias,
        "layer_types": types,
        "sliding_window": window,
        "num_local_experts": model.moe.experts,
        "swiglu_limit": model.moe.limit,
        "swiglu_alpha": model.moe.alpha,
    }


MOE_FAMILIES = (
    Family(
        "mixtral",
        ("MixtralForCausalLM", "MixtralModel"),
        "model.",
        _mixtral_fields,
        _mixtral_mismatches,
        _mixtral_config,
        lambda model: _llama_tensors(model, _mixtral_experts(model)),
        ROPE_BUFFERS,
    ),
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM", "Qwen3MoeModel"),
        "model.",
        _qwen3_moe_fields,
        _qwen3_moe_mismatches,
        _qwen3_moe_config,
        lambda model: _llama_tensors(model, _qwen3_moe_experts(model)),
        ROPE_BUFFERS,
    ),
    Family(
        "gpt_oss",
        ("GptOssForCausalLM", "GptOssModel"),
        "model.",
        _gpt_oss_fields,
        _gpt_oss_mismatches,
        _gpt_oss_config,
        lambda model: _llama_tensors(model, _gpt_oss_experts(model)),
        ROPE_BUFFERS,
        unpack=mxfp4.unpack,
    ),
)
FAMILIES.update({f.model_type: f for f in MOE_FAMILIES})
