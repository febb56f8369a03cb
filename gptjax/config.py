"""Typed, validated configuration: YAML file + dotted `key=value` overrides.

OmegaConf merges the file and the overrides; pydantic checks every key and value. Any mistake
becomes a `ConfigError` with one readable line (the CLI prints it and exits non-zero).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptjax.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override; the message is one line."""


# The device mesh, stated once. Axes in order (the last ones on the nearest devices); each
# `dcn_*` key multiplies the axis it names across hosts (the slower network between them) in a
# hybrid mesh. `expert` shards the experts of MoE layers (gptjax/core/expert_parallel.py) and,
# for everything else, splits the batch and the weights like `fsdp` (docs/sharding.md).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
DCN_AXES = {"data": "dcn_data", "fsdp": "dcn_fsdp", "expert": "dcn_expert"}
# model.remat: "none", or what the backward pass recomputes (gptjax/core/model.py)
Remat = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]
REMATS = get_args(Remat)
# data.packing: how packed windows become batches (gptjax/data/batching.py)
Packing = Literal["concat", "segments"]
PACKINGS = get_args(Packing)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(_Section):
    """How RoPE's frequencies are stretched past the trained context (transformers'
    `rope_scaling`): `linear` divides every frequency by `factor`; `llama3` divides the low
    frequencies by `factor`, keeps the high ones and blends between (wavelengths measured against
    `original_max_position`); `yarn` blends interpolated and original frequencies over the
    dimensions between `beta_slow` and `beta_fast` rotations and scales the rotated q and k by
    `attention_factor` (default 0.1 ln(factor) + 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3", "yarn"]
    factor: float = Field(gt=0.0)
    original_max_position: int | None = Field(
        None, gt=0, description="llama3, yarn: the context the model was trained at"
    )
    low_freq_factor: float = Field(1.0, gt=0.0, description="llama3")
    high_freq_factor: float = Field(4.0, gt=0.0, description="llama3")
    beta_fast: float = Field(32.0, gt=0.0, description="yarn")
    beta_slow: float = Field(1.0, gt=0.0, description="yarn")
    truncate: bool = Field(True, description="yarn: round the blend range to whole dimensions")
    attention_factor: float | None = Field(None, gt=0.0, description="yarn")

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.type in ("llama3", "yarn") and self.original_max_position is None:
            raise ValueError(
                f"model.rope_scaling.type={self.type} needs "
                "model.rope_scaling.original_max_position"
            )
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "model.rope_scaling.high_freq_factor must exceed model.rope_scaling.low_freq_factor"
            )
        return self


class MoEConfig(_Section):
    """A mixture-of-experts MLP (docs/models.md "Mixture of experts"): a linear router picks
    `top_k` of `experts` SwiGLU experts per token; each token's output is the gate-weighted sum
    of its experts' outputs. `model.moe` None (the default) is a dense model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: int = Field(gt=1, description="E, the experts in each MoE layer")
    top_k: int = Field(2, gt=0, description="k, the experts each token is routed to")
    d_ff: int | None = Field(
        None, gt=0, description="each expert's hidden width; default model.d_ff"
    )
    every: int = Field(
        1,
        gt=0,
        description="layer l (from 0) is MoE when (l + 1) % every == 0 (Qwen3's "
        "decoder_sparse_step)",
    )
    dense_layers: tuple[int, ...] = Field(
        (),
        description="layers kept dense even where `every` makes them MoE (Qwen3's mlp_only_layers)",
    )
    router_bias: bool = Field(False, description="a bias on the router's logits (gpt-oss)")
    expert_bias: bool = Field(False, description="biases on the experts' matmuls (gpt-oss)")
    activation: Literal["swiglu", "swiglu_clamped"] = Field(
        "swiglu",
        description="swiglu: silu(gate) * up; swiglu_clamped (gpt-oss): gate <= limit, "
        "|up| <= limit, (up + 1) * gate * sigmoid(alpha * gate)",
    )
    limit: float = Field(7.0, gt=0.0, description="swiglu_clamped: the clamp")
    alpha: float = Field(1.702, gt=0.0, description="swiglu_clamped: the sigmoid's slope")
    gating: Literal["topk_softmax", "softmax_topk"] = Field(
        "topk_softmax",
        description="topk_softmax: softmax over the k chosen logits (gpt-oss, "
        "Mixtral); softmax_topk: softmax over all experts, then the top k (Qwen3)",
    )
    renormalize: bool = Field(
        True, description="softmax_topk: divide the k gates by their sum (Qwen3 norm_topk_prob)"
    )
    aux_loss: float = Field(0.01, ge=0.0, description="load-balancing loss coefficient")
    z_loss: float = Field(0.001, ge=0.0, description="router z-loss coefficient")
    capacity_factor: float | None = Field(
        None,
        gt=0.0,
        description="each expert takes at most ceil(capacity_factor * tokens * "
        "top_k / experts) tokens, the rest dropped; None: dropless",
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.experts:
            raise ValueError(
                f"model.moe.top_k={self.top_k} exceeds model.moe.experts={self.experts}"
            )
        return self


def window_of(kind: str) -> int | None:
    """The window W of an attention_pattern entry ("local:W"), None for "dense"."""
    return None if kind == "dense" else int(kind.split(":", 1)[1])


class ModelConfig(_Section):
    # frozen: hashable, a static jit argument; `head_dim` is the key, `head_size` the field
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    vocab_size: int = Field(8192, gt=0)
    seq_len: int = Field(256, gt=0)
    max_positions: int | None = Field(None, gt=0, description="position table; default seq_len")
    n_layer: int = Field(4, gt=0)
    n_head: int = Field(4, gt=0)
    d_model: int = Field(256, gt=0)
    d_ff: int | None = Field(None, gt=0, description="MLP width; default 4 * d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Remat = "none"
    scan_layers: bool = True
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    loss_chunk: int = Field(
        0, ge=0, description="cross-entropy over chunks of this many positions; 0: all at once"
    )
    vocab_valid: int | None = Field(
        None,
        gt=0,
        description="ids at or above this are padding (never predicted, no probability); "
        "default: all of vocab_size",
    )
    # --- the block (defaults: GPT-2's) ---
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0.0, description="every norm's epsilon (GPT-2: 1e-5)")
    norm_placement: Literal["pre", "post"] = Field(
        "pre", description="pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (GPT-1)"
    )
    final_norm: bool = Field(True, description="a norm after the last block (GPT-1: none)")
    positions: Literal["learned", "rope", "none"] = "learned"
    rope_theta: float = Field(10000.0, gt=0.0)
    rope_scaling: RopeScaling | None = None
    n_kv_head: int | None = Field(None, gt=0, description="key/value heads; default n_head")
    head_size: int | None = Field(
        None, gt=0, alias="head_dim", description="per-head width; default d_model // n_head"
    )
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys")
    attention_pattern: tuple[str, ...] = Field(
        ("dense",),
        min_length=1,
        description='"dense" or "local:W" (a query sees itself and the W-1 tokens before it) '
        "per layer, repeated over the layers",
    )
    attention_sinks: bool = Field(False, description="a learned logit per head in every softmax")
    attention_scale: float | None = Field(
        None, gt=0.0, description="score scale; default 1/sqrt(head_dim) (GPT-Neo: 1.0)"
    )
    mlp: Literal["gelu_tanh", "gelu", "swiglu", "relu2"] = "gelu_tanh"
    embed_scale: float = Field(1.0, gt=0.0, description="token embeddings times this")
    logit_softcap: float = Field(
        0.0,
        ge=0.0,
        description="> 0: logits = c * tanh(logits / c) (Gemma 2, modded-nanogpt); 0: off",
    )
    moe: MoEConfig | None = Field(None, description="a mixture-of-experts MLP; None: dense")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_size is None and self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
                "; set model.head_dim"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}"
            )
        if self.loss_chunk and self.seq_len % self.loss_chunk:
            raise ValueError(
                f"model.loss_chunk={self.loss_chunk} does not divide model.seq_len={self.seq_len}"
            )
        if self.vocab_valid is not None and self.vocab_valid > self.vocab_size:
            raise ValueError(
                f"model.vocab_valid={self.vocab_valid} exceeds model.vocab_size={self.vocab_size}"
            )
        if self.max_positions is not None and self.seq_len > self.max_positions:
            raise ValueError(
                f"model.seq_len={self.seq_len} exceeds model.max_positions={self.max_positions}"
            )
        for kind in self.attention_pattern:
            _, colon, width = kind.partition(":")
            if kind != "dense" and not (
                kind.startswith("local:") and width.isdigit() and int(width) > 0
            ):
                raise ValueError(
                    f'model.attention_pattern entry {kind!r}: use "dense" or "local:W" '
                    "(W a positive window, e.g. local:256)"
                )
        if self.n_layer % len(self.attention_pattern):
            raise ValueError(
                f"model.attention_pattern has {len(self.attention_pattern)} entries, which does "
                f"not divide model.n_layer={self.n_layer}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.positions=rope needs an even head size, not {self.head_dim}")
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError("model.rope_scaling applies to model.positions=rope")
        if self.moe is not None:
            self._check_moe(self.moe)
        return self

    def _check_moe(self, moe: MoEConfig) -> None:
        bad = [i for i in moe.dense_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(
                f"model.moe.dense_layers: layer {bad[0]} is not in 0..{self.n_layer - 1}"
            )
        if not any(self.moe_layers()):
            raise ValueError(
                f"model.moe: no layer is MoE (every={moe.every}, dense_layers="
                f"{list(moe.dense_layers)}, n_layer={self.n_layer}); set model.moe=null for a "
                "dense model"
            )

    def moe_layers(self) -> tuple[bool, ...]:
        """Whether each layer's MLP is the mixture of experts (all False for a dense model)."""
        moe = self.moe
        if moe is None:
            return (False,) * self.n_layer
        return tuple(
            (i + 1) % moe.every == 0 and i not in moe.dense_layers for i in range(self.n_layer)
        )

    @property
    def scan_group(self) -> int:
        """Layers per scan step: the shortest run that repeats both the attention pattern and
        the MoE/dense layout over the layers (the pattern's length for a uniform layout; up to
        n_layer when model.moe.dense_layers breaks the period)."""
        P, L, layout = len(self.attention_pattern), self.n_layer, self.moe_layers()
        for Q in range(P, L + 1, P):
            if L % Q == 0 and all(layout[i] == layout[i % Q] for i in range(L)):
                return Q
        return L

    @property
    def expert_ff(self) -> int:
        """Each expert's hidden width (model.moe.d_ff, default the dense MLP's)."""
        return (self.moe.d_ff if self.moe else None) or self.ff

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def n_positions(self) -> int:
        """The context the model can address: the learned table's size (max_positions or
        seq_len); rotary and position-free models use the same bound."""
        return self.max_positions or self.seq_len

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head, default n_head): n_head / kv_heads queries share one."""
        return self.n_kv_head or self.n_head

    def windows(self) -> list[int | None]:
        """The attention window of every layer (None: dense), the pattern repeated."""
        reps = self.n_layer // len(self.attention_pattern)
        return [window_of(kind) for kind in self.attention_pattern] * reps

    @property
    def vocab(self) -> int:
        """Ids that can be predicted (the rest of the table is padding)."""
        return self.vocab_valid or self.vocab_size


class MeshConfig(_Section):
    data: int = -1
    fsdp: int = 1
    expert: int = Field(1, description="MoE: experts split over this many devices")
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    rules: dict[str, str | list[str] | None] | None = Field(
        None, description="logical axis -> mesh axis (or list, or null); default in sharding.py"
    )

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        for name in MESH_AXES:
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise ValueError(f"mesh.{name}={value}: use a positive size or -1 (fill)")
        if [getattr(self, name) for name in MESH_AXES].count(-1) > 1:
            raise ValueError(f"only one of {', '.join('mesh.' + a for a in MESH_AXES)} may be -1")
        for name in DCN_AXES.values():
            if getattr(self, name) < 1:
                raise ValueError(f"mesh.{name}={getattr(self, name)} must be >= 1")
        return self

    def sizes(self) -> dict[str, int]:
        """{axis: size within a host (-1 fills)} for every mesh axis."""
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def dcn(self) -> dict[str, int]:
        """{axis: number of hosts the axis spans} for every mesh axis (1 for most)."""
        return {
            axis: getattr(self, DCN_AXES[axis]) if axis in DCN_AXES else 1 for axis in MESH_AXES
        }

    def on_local_devices(self) -> MeshConfig:
        """The same rules on whatever devices one process has: every device on `data`, no
        multi-host factors (what sample, eval and export use for a run trained on any mesh)."""
        reset = {axis: 1 for axis in MESH_AXES} | {key: 1 for key in DCN_AXES.values()}
        return self.model_copy(update={**reset, "data": -1})

    def one_device(self) -> MeshConfig:
        """One device, one process (debug mode)."""
        return self.on_local_devices().model_copy(update={"data": 1})


class MixtureSource(_Section):
    """One source of a mixture: `{source, weight}` (+ `name`, default from the source)."""

    source: str
    weight: float
    name: str | None = Field(None, description="in eval_loss/NAME; default: from the source")


class MixturePhase(_Section):
    """From step `at` on (steps numbered as in metrics.jsonl, `at` updates done), the mixture
    is `mixture`."""

    at: int = Field(gt=0)
    mixture: list[MixtureSource]


class DataConfig(_Section):
    source: str = "stdlib"
    mixture: list[MixtureSource] | None = Field(
        None,
        description="[{source, weight}, ...]: rows drawn from each by weight; replaces data.source",
    )
    phases: list[MixturePhase] | None = Field(
        None, description="[{at: STEP, mixture: [...]}, ...]: the mixture from step STEP on"
    )
    workers: int = Field(
        0, ge=0, description="processes tokenising in parallel; 0: one per CPU core"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer file (.model: SentencePiece, .json: BPE); None: train"
    )
    vocab_size: int = Field(8192, gt=255, description="pieces when training the tokenizer")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    cache_dir: str | None = Field(None, description="default: $GPTJAX_CACHE or ~/.cache/gptjax")
    tokenizer_sample_bytes: int = Field(20_000_000, gt=0)
    tfds_data_dir: str | None = Field(
        None, description="for tfds:NAME; default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    val_max_documents: int = Field(10_000, gt=0, description="cap on held-out documents")
    prefetch: int = Field(2, ge=0, description="batches built ahead in a background thread")
    packing: Packing = Field(
        "concat",
        description="concat: documents joined by the end token attend across it (GPT-2/GPT-3); "
        "segments: attention and positions restart at each document",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.phases and self.mixture is None:
            raise ValueError("data.phases needs data.mixture (the mixture before the first phase)")
        mixtures = [("data.mixture", self.mixture or [])]
        mixtures += [
            (f"data.phases[{i}].mixture", p.mixture) for i, p in enumerate(self.phases or [])
        ]
        for where, mixture in mixtures if self.mixture is not None else []:
            if not mixture:
                raise ValueError(f"{where} is empty: list at least one {{source, weight}}")
            for i, entry in enumerate(mixture):
                if not 0 < entry.weight < math.inf:  # also NaN
                    raise ValueError(
                        f"{where}[{i}].weight={entry.weight} ({entry.source}): a weight must be "
                        "a positive number"
                    )
                if not entry.source.strip():
                    raise ValueError(f"{where}[{i}].source is empty")
        starts = [p.at for p in self.phases or []]
        if starts != sorted(set(starts)):
            raise ValueError(f"data.phases: steps `at` {starts} must increase")
        return self


class TrainConfig(_Section):
    steps: int = Field(200, ge=0)
    batch_size: int = Field(16, gt=0)
    micro_batches: int = Field(1, gt=0)
    eval_every: int = Field(100, ge=0, description="0: only at the end")
    eval_steps: int = Field(8, gt=0)
    log_every: int = Field(10, gt=0)
    max_bad_steps: int = Field(
        10, gt=0, description="non-finite steps in a row (each skipped) before stopping"
    )
    profile_steps: list[int] | None = Field(
        None, description="[first, last] (numbered as in metrics.jsonl): trace into run_dir/profile"
    )
    step_timeout: float = Field(
        0.0, ge=0.0, description="seconds without progress before the watchdog exits; 0: off"
    )
    init_from: str | None = Field(
        None,
        description="RUN_DIR[@STEP]: start from that run's parameters (and tokenizer) with a "
        "fresh optimiser and schedule at step 0 (fine-tuning); a resumed run ignores it",
    )
    stop_at: int = Field(
        0,
        ge=0,
        description="stop (with a checkpoint) after this step, as if preempted; the schedule "
        "still runs to train.steps; 0: off",
    )
    eval_tasks: list[str] = Field(
        [],
        description="tasks (built-in names or task files, docs/evaluation.md) scored at every "
        "eval_every and at the end, logged as eval/TASK/acc and eval/TASK/acc_norm",
    )
    eval_shots: int = Field(0, ge=0, description="few-shot examples before each eval_tasks prompt")
    eval_limit: int | None = Field(
        None, gt=0, description="score the first N examples of each eval_tasks task; None: all"
    )
    # preference objectives (docs/preference.md, gptjax/core/preference.py): one block
    objective: Literal["lm", "dpo", "reward"] = Field(
        "lm",
        description="lm: next-token loss; dpo: DPO on data.source=prefs:PATH against "
        "train.reference; reward: a Bradley-Terry reward model on prefs:PATH",
    )
    reference: str | None = Field(
        None, description="RUN_DIR[@STEP]: DPO's frozen reference; None: train.init_from"
    )
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO's beta (the KL penalty's strength)")
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="the share of pairs assumed mislabelled (cDPO)"
    )
    dpo_loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO's loss, or IPO's")
    # knowledge distillation (gptjax/core/distill.py, docs/compression.md)
    distill_from: str | None = Field(
        None,
        description="RUN_DIR[@STEP]: a frozen teacher (same tokenizer); the loss becomes "
        "distill_alpha * T^2 * KL(teacher || student at T) + (1 - distill_alpha) * cross-entropy",
    )
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0, description="the KL term's weight")
    distill_temperature: float = Field(2.0, gt=0.0, description="T, softening both models")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.profile_steps is not None and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ValueError(
                f"train.profile_steps={self.profile_steps}: use [first, last] with "
                "1 <= first <= last, e.g. [10, 12]"
            )
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.micro_batches={self.micro_batches}"
            )
        if self.objective != "lm" and self.batch_size % (2 * self.micro_batches):
            raise ValueError(
                f"train.objective={self.objective}: train.batch_size={self.batch_size} rows must "
                f"be 2 per pair in each of the train.micro_batches={self.micro_batches}: make it "
                f"a multiple of {2 * self.micro_batches}"
            )
        return self


class OptimConfig(_Section):
    lr: float = Field(6e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="WSD: final decay share")
    decay_steps: int | None = Field(
        None, gt=0, description="cosine: reach the floor at this step, then hold; None: the end"
    )
    decay_tokens: int | None = Field(
        None, gt=0, description="cosine: as decay_steps, in tokens (batch_size * seq_len a step)"
    )
    weight_decay: float = Field(0.1, ge=0.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    clip_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    name: Literal["adamw", "muon"] = Field(
        "adamw",
        description="muon: Muon on the hidden weight matrices, AdamW (the keys above) on the "
        "embeddings, head, norms and biases",
    )
    muon_lr: float = Field(
        0.02, gt=0.0, description="muon: the matrices' peak lr (same warmup and decay as lr)"
    )
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="muon: momentum")
    muon_nesterov: bool = Field(True, description="muon: Nesterov momentum")
    muon_ns_steps: int = Field(5, gt=0, description="muon: Newton-Schulz iterations")
    muon_weight_decay: float = Field(
        0.0, ge=0.0, description="muon: decoupled decay of the matrices, times the muon lr"
    )

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        decay = {"decay_steps": self.decay_steps, "decay_tokens": self.decay_tokens}
        given = [f"optim.{key}" for key, value in decay.items() if value is not None]
        if len(given) == 2:
            raise ValueError("optim.decay_steps and optim.decay_tokens are both set; set one")
        if given and self.schedule != "cosine":
            raise ValueError(f"{given[0]} applies to optim.schedule=cosine, not {self.schedule}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.decay_steps={self.decay_steps} must exceed "
                f"optim.warmup_steps={self.warmup_steps}"
            )
        return self


class CheckpointConfig(_Section):
    every: int = Field(500, ge=0, description="0: only at the end")
    keep: int = Field(3, gt=0)
    keep_period: int = Field(0, ge=0, description="also keep every step divisible by this; 0: no")
    async_: bool = Field(True, alias="async")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class DistributedConfig(_Section):
    init_timeout: int = Field(300, gt=0, description="seconds to wait for every process to join")
    heartbeat_timeout: int = Field(100, gt=0, description="seconds before a silent peer is dead")


class DebugConfig(_Section):
    enabled: bool = Field(False, description="one device, NaN checks, timings (--debug)")
    no_jit: bool = Field(False, description="run eagerly (jax.disable_jit) for pdb")
    nans: bool = Field(True, description="jax_debug_nans + a finiteness check every step")
    log_compiles: bool = Field(True, description="log every compilation (jax_log_compiles)")
    steps: int = Field(
        10,
        gt=0,
        description="`gptjax train --debug` stops after this many steps unless the command "
        "line gives train.steps or train.stop_at",
    )


class Config(_Section):
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    debug: DebugConfig = DebugConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a pydantic model, nested sections included (aliases as written)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, key + "."))
    return keys


def explain(error: ValidationError, root: type[BaseModel] | None = None, noun="config") -> str:
    """One line for pydantic's first error; an unknown key suggests the closest valid one."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        known = valid_keys(root or Config)
        close = difflib.get_close_matches(location, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {noun} key '{location}'{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return message
    return f"{location or noun}: {message} (got {first.get('input')!r})"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model.n_layer": 4, ...}: a config dict with dotted keys (`mesh.rules` kept whole)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rules":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(explain(error)) from None


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
    try:
        merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad override: {str(error).splitlines()[0]}") from None
    return from_dict(raw)
