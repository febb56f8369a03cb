"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> gptjax runs: weights, config.json, the tokenizer.

`import_run` reads a local HF directory (`model.safetensors` or `pytorch_model.bin`, possibly
sharded with an index; keys with or without the `transformer.` prefix; `config.json`; a tokenizer)
and writes a normal gptjax run at step 0: config.yaml, the tokenizer file, and an Orbax checkpoint
{params, fresh AdamW state, step 0}, so `sample`, `eval` and `train` (fine-tuning) use it as they
use any run. The vocabulary is padded to a multiple of 128 (`model.vocab_valid` keeps the padding
out of logits, loss and sampling). `export_run` writes `model.safetensors` + `config.json` + the
tokenizer that `transformers` loads with `from_pretrained`; a padded vocabulary is trimmed to the
tokenizer's size. Both directions read the one layout table `LAYOUT`.

HF GPT-2 stores Conv1D weights [in, out] (what gptjax's einsums use, so most tensors are plain
reshapes), q/k/v side by side in `c_attn` [D, 3D] (heads contiguous: [D, 3, N, H] in gptjax),
`lm_head` [V, D] tied to `wte`; `attn.bias`/`attn.masked_bias` are causal-mask buffers, not weights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import ConfigError, ModelConfig
from gptjax.interop import INSTALL_HINT, InteropError

# HF tensor (under `transformer.`; "{i}" = layer) -> gptjax parameter, HF shape in dimensions
# (V vocab, P positions, D d_model, F d_ff). Per-layer tensors are stacked on gptjax's leading
# layers axis; each is a plain reshape between the two layouts, except `lm_head` ([V, D] in HF,
# [D, V] in gptjax: transposed). The one table both import and export read.
LAYOUT = (
    ("wte.weight", "wte", ("V", "D")),
    ("wpe.weight", "wpe", ("P", "D")),
    ("h.{i}.ln_1.weight", "blocks.ln1_scale", ("D",)),
    ("h.{i}.ln_1.bias", "blocks.ln1_bias", ("D",)),
    ("h.{i}.attn.c_attn.weight", "blocks.qkv_w", ("D", "3D")),
    ("h.{i}.attn.c_attn.bias", "blocks.qkv_b", ("3D",)),
    ("h.{i}.attn.c_proj.weight", "blocks.out_w", ("D", "D")),
    ("h.{i}.attn.c_proj.bias", "blocks.out_b", ("D",)),
    ("h.{i}.ln_2.weight", "blocks.ln2_scale", ("D",)),
    ("h.{i}.ln_2.bias", "blocks.ln2_bias", ("D",)),
    ("h.{i}.mlp.c_fc.weight", "blocks.fc_w", ("D", "F")),
    ("h.{i}.mlp.c_fc.bias", "blocks.fc_b", ("F",)),
    ("h.{i}.mlp.c_proj.weight", "blocks.proj_w", ("F", "D")),
    ("h.{i}.mlp.c_proj.bias", "blocks.proj_b", ("D",)),
    ("ln_f.weight", "ln_f_scale", ("D",)),
    ("ln_f.bias", "ln_f_bias", ("D",)),
)
LM_HEAD = ("lm_head.weight", "lm_head", ("V", "D"))  # only when the head is untied
PREFIX = "transformer."
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks saved by old transformers

# gptjax model field <-> config.json field (import reads them, export writes them)
FIELDS = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "d_model": "n_embd",
    "max_positions": "n_positions",
    "d_ff": "n_inner",
    "tie_embeddings": "tie_word_embeddings",
}
# config.json fields gptjax computes only one way: the accepted values (the first is HF's default,
# used when the field is absent, and what export writes)
FIXED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # GELU, tanh approximation
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
VOCAB_MULTIPLE = 128


def _dims(model: ModelConfig, vocab: int) -> dict[str, int]:
    D = model.d_model
    return {"V": vocab, "P": model.n_positions, "D": D, "3D": 3 * D, "F": model.ff}


def _layout(model: ModelConfig):
    """(hf name, gptjax name, layer or None, HF shape) for every tensor of `model`."""
    rows = [*LAYOUT] if model.tie_embeddings else [*LAYOUT, LM_HEAD]
    for hf, ours, shape in rows:
        if "{i}" in hf:
            for i in range(model.n_layer):
                yield hf.format(i=i), ours, i, shape
        else:
            yield hf, ours, None, shape


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


# -- config.json ------------------------------------------------------------------------------


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise InteropError(f"{directory} has no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InteropError(f"{path} is not valid JSON: {error}") from None
    if hf.get("model_type") != "gpt2":
        raise InteropError(
            f"{path}: model_type={hf.get('model_type')!r}; gptjax imports only 'gpt2'"
        )
    other = [a for a in hf.get("architectures") or [] if a not in ARCHITECTURES]
    if other:
        raise InteropError(f"{path}: architectures={other}; gptjax imports {list(ARCHITECTURES)}")
    for field, accepted in FIXED.items():
        value = hf.get(field, accepted[0])
        if value not in accepted:
            allowed = " or ".join(map(repr, accepted))
            raise InteropError(f"{path}: {field}={value!r}; gptjax computes only {allowed}")
    for field in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            raise InteropError(f"{path}: {field}={hf.get(field)!r} is not a positive integer")
    return hf


def model_fields(hf: dict[str, Any], n_tokens: int) -> tuple[dict, dict]:
    """(fixed, default) gptjax model fields for an HF config and a tokenizer of `n_tokens`.

    Fixed fields decide the parameter shapes; the defaults (seq_len, dropout) may be overridden."""
    if n_tokens > hf["vocab_size"]:
        raise InteropError(
            f"the tokenizer has {n_tokens} tokens but config.json vocab_size={hf['vocab_size']}"
        )
    fixed = {ours: hf.get(theirs) for ours, theirs in FIELDS.items()}
    fixed["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    padded = -(-hf["vocab_size"] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    fixed["vocab_size"] = padded
    fixed["vocab_valid"] = None if n_tokens == padded else n_tokens
    # gptjax has one dropout (embeddings and residuals) and none on attention weights; fine-tuning
    # starts without it: set model.dropout to use it.
    defaults = {"seq_len": hf["n_positions"], "dropout": 0.0}
    return fixed, defaults


def hf_config(model: ModelConfig, n_tokens: int, eod_id: int) -> dict[str, Any]:
    """config.json of `model` with its vocabulary trimmed to `n_tokens`."""
    values = {theirs: getattr(model, ours) for ours, theirs in FIELDS.items()}
    values["n_positions"], values["n_inner"] = model.n_positions, model.ff
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": n_tokens,
        **values,
        "n_ctx": model.n_positions,
        **{field: accepted[0] for field, accepted in FIXED.items()},
        "embd_pdrop": model.dropout,
        "resid_pdrop": model.dropout,
        "attn_pdrop": 0.0,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


# -- weights ----------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise InteropError(f"reading {path.name} needs safetensors: {INSTALL_HINT}") from None
    import jax

    out = {}
    try:  # the flax reader also takes bfloat16, which NumPy alone cannot
        with safe_open(str(path), framework="flax") as file:
            for key in file.keys():
                out[key] = np.asarray(jax.device_get(file.get_tensor(key)), np.float32)
    except (SafetensorError, OSError) as error:
        raise InteropError(f"{path}: not a readable safetensors file ({error})") from None
    return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """A `pytorch_model.bin` state dict, unpickling tensors only (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise InteropError(f"reading {path.name} needs torch: {INSTALL_HINT}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only unpickler met something else
        raise InteropError(
            f"{path}: holds objects other than tensors; refusing to unpickle it "
            "(save the weights as safetensors where the model was made)"
        ) from None
    except Exception as error:  # noqa: BLE001 - zip, EOF and torch errors alike
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise InteropError(f"{path}: not a readable PyTorch file ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InteropError(f"{path}: not a flat state dict of tensors")
    return {key: value.detach().to(torch.float32).numpy() for key, value in state.items()}


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor in the directory's weight file(s), f32, keys without `transformer.`."""
    found = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found:
        raise InteropError(f"{directory} has no weights ({', '.join(WEIGHT_FILES)})")
    name = found[0]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise InteropError(f"{directory / name}: no weight_map") from None
        paths = [directory / shard for shard in shards]
    else:
        paths = [directory / name]
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        if not path.is_file():
            raise InteropError(f"{path} (listed in {name}) is missing")
        read = _read_safetensors if path.suffix == ".safetensors" else _read_torch
        tensors.update(read(path))
    return {key.removeprefix(PREFIX): value for key, value in tensors.items()}


def to_gptjax(tensors: dict[str, np.ndarray], model: ModelConfig, hf_vocab: int) -> dict:
    """gptjax parameters (a nested dict of f32 arrays) from HF tensors; one line per problem."""
    from gptjax.core import model as model_module

    tensors = {k: v for k, v in tensors.items() if not k.endswith(BUFFERS)}
    if model.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        wte = tensors.get("wte.weight")
        if wte is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
            raise InteropError(
                "lm_head.weight differs from wte.weight but config.json has "
                "tie_word_embeddings=true (an untied head): set it to false to import it"
            )
    dims = _dims(model, hf_vocab)
    layout = list(_layout(model))
    expected = {hf for hf, *_ in layout}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise InteropError(f"unexpected tensor {unexpected[0]}{more}: not part of GPT-2")
    shapes = model_module.param_shapes(model)
    layers: dict[str, list] = {}
    params: dict = {}
    for hf, ours, layer, symbols in layout:
        if hf not in tensors:
            raise InteropError(f"missing tensor {hf} (or {PREFIX}{hf})")
        value, shape = tensors[hf], tuple(dims[s] for s in symbols)
        if value.shape != shape:
            raise InteropError(
                f"tensor {hf} has shape {list(value.shape)}; config.json implies {list(shape)}"
            )
        if layer is not None:
            layers.setdefault(ours, []).append(value)
            continue
        if symbols[0] == "V":  # pad the vocabulary with zero rows
            value = np.pad(value, ((0, model.vocab_size - hf_vocab), (0, 0)))
        _set(params, ours, value.T if ours == LM_HEAD[1] else value)
    for ours, values in layers.items():
        _set(params, ours, np.stack(values).reshape(shapes[ours]))
    return params


def to_hf(params: dict, model: ModelConfig, n_tokens: int) -> dict[str, np.ndarray]:
    """HF tensors (f32, `transformer.`-prefixed as `GPT2LMHeadModel` saves them) of gptjax
    parameters, the vocabulary trimmed to `n_tokens`."""
    dims = _dims(model, n_tokens)
    out = {}
    for hf, ours, layer, symbols in _layout(model):
        value = np.asarray(_get(params, ours), np.float32)
        if ours == LM_HEAD[1]:
            value = value.T
        if layer is not None:
            value = value[layer]
        if symbols[0] == "V":
            value = value[:n_tokens]
        name = hf if hf == LM_HEAD[0] else PREFIX + hf
        out[name] = np.ascontiguousarray(value.reshape([dims[s] for s in symbols]))
    return out


# -- runs -------------------------------------------------------------------------------------


def import_run(directory: str | Path, run_dir: str | Path, overrides: list[str] = ()) -> Path:
    """A gptjax run at step 0 from a local HF GPT-2 directory; `overrides` (key=value) may set
    anything but the parameter shapes (e.g. model.seq_len, train.*, optim.*, data.*)."""
    import jax

    from gptjax import config
    from gptjax.core import steps
    from gptjax.interop import hf_tokenizer
    from gptjax.training import checkpoint, runs

    directory, run_dir = Path(directory), Path(run_dir)
    if not directory.is_dir():
        raise InteropError(f"{directory} is not a directory")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise InteropError(f"{run_dir} exists and is not empty; choose a new --run-dir")
    hf = read_config(directory)
    tokenizer = hf_tokenizer.load(directory)
    fixed, defaults = model_fields(hf, tokenizer.vocab_size)
    given = {item.split("=", 1)[0] for item in overrides}
    for key in fixed:
        if f"model.{key}" in given:
            raise ConfigError(f"model.{key} comes from {directory / 'config.json'}; drop it")
    fields = {**defaults, **fixed}
    dotted = [f"model.{key}={json.dumps(value)}" for key, value in fields.items()]
    base = [f"run_dir={run_dir}", "model.param_dtype=float32", *dotted]
    cfg = config.load(None, [*base, *overrides])
    params = to_gptjax(read_tensors(directory), cfg.model, hf["vocab_size"])

    # Write next to the target and rename when complete: never a half-written run.
    scratch = run_dir.parent / f".{run_dir.name}.import-{os.getpid()}"
    try:
        try:
            scratch.mkdir(parents=True)
        except OSError as error:
            raise InteropError(f"cannot create {run_dir}: {error.strerror}") from None
        (scratch / "config.yaml").write_text(cfg.to_yaml())
        tokenizer.save(scratch / tokenizer.filename)
        setup = steps.build(runs.read_config(scratch), jax.devices()[:1])  # one device
        state = steps.fresh_state(setup, params)  # fine-tuning starts with fresh AdamW state
        ckpt = checkpoint.Checkpointer(scratch, keep=1, async_save=False)
        try:
            ckpt.save(0, state, cfg.to_dict())
        finally:
            ckpt.close()
        if run_dir.exists():
            run_dir.rmdir()  # empty (checked above)
        scratch.rename(run_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return run_dir


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """`out`/model.safetensors + config.json + the tokenizer, from a run's checkpoint."""
    from gptjax.interop import hf_tokenizer
    from gptjax.training import runs

    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise InteropError(f"exporting to Hugging Face needs safetensors: {INSTALL_HINT}") from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} exists and is not an empty directory; choose a new --out")
    setup, params, tokenizer = runs.load_run(run_dir, step)
    model = setup.cfg.model
    n_tokens = tokenizer.vocab_size
    if n_tokens > model.vocab_size:
        raise InteropError(f"the tokenizer has {n_tokens} ids; model.vocab_size={model.vocab_size}")
    import jax

    tensors = to_hf(jax.device_get(params), model, n_tokens)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InteropError(f"cannot create {out}: {error.strerror}") from None
    scratch = out / ".model.safetensors.tmp"
    save_file(tensors, str(scratch), metadata={"format": "pt"})
    scratch.rename(out / "model.safetensors")
    config_json = hf_config(model, n_tokens, tokenizer.eod_id)
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    hf_tokenizer.save(tokenizer, out, model.n_positions)
    return out
