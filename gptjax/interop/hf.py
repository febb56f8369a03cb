"""Hugging Face checkpoints <-> gptjax runs: weights, config.json, the tokenizer, for every
family in gptjax/interop/hf_families.py (openai-gpt, gpt2, gpt_neo, llama, mistral, qwen2,
qwen3, mixtral, qwen3_moe, gpt_oss).

`import_run` reads a local HF directory (`model.safetensors` or `pytorch_model.bin`, possibly
sharded with an index; keys with or without the family's `transformer.` / `model.` prefix;
`config.json`; a tokenizer) and writes a normal gptjax run at step 0: config.yaml, the tokenizer
file, and an Orbax checkpoint {params, fresh AdamW state, step 0}, so `sample`, `eval` and
`train` (fine-tuning) use it as they use any run. The vocabulary is padded to a multiple of 128
(`model.vocab_valid` keeps the padding out of logits, loss and sampling). `export_run` writes
`model.safetensors` + `config.json` + the tokenizer that `transformers` loads with
`from_pretrained`, as the family that computes the run's model; a padded vocabulary is trimmed
to the tokenizer's size. Both directions read the family's one table (`Family.tensors`): each
HF tensor is a gptjax parameter or one q/k/v slice of a fused one, reshaped (and transposed for
`nn.Linear` weights); saved buffers (causal masks, RoPE tables) are skipped.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import atomic
from gptjax.config import ConfigError, ModelConfig
from gptjax.interop import INSTALL_HINT, InteropError
from gptjax.interop import hf_families as families
from gptjax.interop.hf_families import Family, positive_int

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
VOCAB_MULTIPLE = 128
# rotary models address up to max_position_embeddings (131,072 for Llama 3) with no table: the
# imported seq_len (what a sample's cache and a fine-tune's windows hold) defaults to at most this
ROPE_SEQ_LEN = 2048
# what an imported mixture of experts may change: training settings, not what it computes
MOE_TRAINING = ("model.moe.aux_loss", "model.moe.z_loss", "model.moe.capacity_factor")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _rows(model: ModelConfig, family: Family):
    """(hf name under the prefix, its Tensor row, the index of its slot in the gptjax
    parameter) of every tensor of `model`. A per-layer row's slot starts with its layer's place
    in its stack: every layer ("all"), or only the dense-MLP or the MoE layers, each stacked over
    its own kind (model.moe); an expert row's ("{j}") continues with the expert, a `part` row's
    with the fused axis' index."""
    moe_layers = families.moe_layers(model)
    stacks = {"all": list(range(model.n_layer))}
    stacks["moe"] = [i for i in range(model.n_layer) if moe_layers[i]]
    stacks["dense"] = [i for i in range(model.n_layer) if not moe_layers[i]]
    for row in family.tensors(model):
        part = () if row.part is None else (*([slice(None)] * row.part[0]), row.part[1])
        if not row.per_layer:
            yield row.hf, row, part
            continue
        for place, i in enumerate(stacks[row.layers]):
            if row.per_expert:
                for j in range(model.moe.experts):
                    yield row.hf.format(i=i, j=j), row, (place, j, *part)
            else:
                yield row.hf.format(i=i), row, (place, *part)


def _hf_slice(row, ndim: int) -> tuple:
    """The index of a row's values in its HF tensor (all of it, or gpt-oss's interleaved gate
    or up columns: `hf_slice` (axis, start, step))."""
    if row.hf_slice is None:
        return ()
    axis, start, step = row.hf_slice
    return (*([slice(None)] * (axis % ndim)), slice(start, None, step))


# -- config.json ------------------------------------------------------------------------------


def read_config(directory: Path) -> tuple[dict[str, Any], Family]:
    """config.json and the family its model_type names."""
    path = directory / "config.json"
    if not path.is_file():
        raise InteropError(f"{directory} has no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InteropError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{path} is not a JSON object")
    family = families.family_of_config(hf, str(path))
    positive_int(hf, "vocab_size")
    return hf, family


def model_fields(hf: dict[str, Any], family: Family, n_tokens: int) -> tuple[dict, dict]:
    """(fixed, default) gptjax model fields for an HF config and a tokenizer of `n_tokens`.

    Fixed fields decide the parameter shapes and what the model computes; the defaults
    (seq_len, dropout) may be overridden."""
    if n_tokens > hf["vocab_size"]:
        raise InteropError(
            f"the tokenizer has {n_tokens} tokens but config.json vocab_size={hf['vocab_size']}"
        )
    quantized = hf.get("quantization_config")
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
        if family.unpack is None or method != "mxfp4":
            raise InteropError(
                f"config.json: quantization_config.quant_method={method!r}; gptjax imports "
                "unquantized weights (and gpt-oss's mxfp4 experts)"
            )
    fixed = family.fields(hf)
    padded = -(-hf["vocab_size"] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    fixed["vocab_size"] = padded
    fixed["vocab_valid"] = None if n_tokens == padded else n_tokens
    seq_len = fixed["max_positions"]
    if fixed.get("positions") == "rope":
        seq_len = min(seq_len, ROPE_SEQ_LEN)
    # gptjax has one dropout (embeddings and residuals) and none on attention weights; fine-tuning
    # starts without it: set model.dropout to use it.
    defaults = {"seq_len": seq_len, "dropout": 0.0}
    return fixed, defaults


def hf_config(model: ModelConfig, family: Family, n_tokens: int, eod_id: int) -> dict[str, Any]:
    """config.json of `model` in `family`, its vocabulary trimmed to `n_tokens`."""
    return {
        "architectures": [family.architectures[0]],
        "model_type": family.model_type,
        "vocab_size": n_tokens,
        **family.config(model),
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
                value = np.asarray(jax.device_get(file.get_tensor(key)))
                # floats as f32; integers (gpt-oss's MXFP4 blocks and scales: uint8) as they are
                kind = value.dtype.kind in "iub"
                out[key] = value if kind else np.asarray(value, np.float32)
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


def read_tensors(directory: Path, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """Every tensor in the directory's weight file(s), f32, keys without `prefix`."""
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
    return {key.removeprefix(prefix): value for key, value in tensors.items()}


def to_gptjax(
    tensors: dict[str, np.ndarray], cfg: ModelConfig, hf_vocab: int, family: Family
) -> dict:
    """gptjax parameters (a nested dict of f32 arrays) from HF tensors (keys without the
    family's prefix); one line per problem."""
    from gptjax.core import model

    tensors = {k: v for k, v in tensors.items() if not k.endswith(family.buffers)}
    if family.unpack is not None:  # gpt-oss: MXFP4 expert weights dequantized
        tensors = family.unpack(tensors)
    embedding = family.embedding()
    if cfg.tie_embeddings and families.LM_HEAD in tensors:
        head = tensors.pop(families.LM_HEAD)
        wte = tensors.get(embedding)
        if wte is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
            raise InteropError(
                f"lm_head.weight differs from {embedding} but config.json has "
                "tie_word_embeddings=true (an untied head): set it to false to import it"
            )
    dims = families.dims(cfg, hf_vocab)
    rows = list(_rows(cfg, family))
    unexpected = sorted(set(tensors) - {name for name, *_ in rows})
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise InteropError(
            f"unexpected tensor {unexpected[0]}{more}: not part of {family.model_type} as "
            "config.json describes it"
        )
    shapes = model.param_shapes(cfg)
    params = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    filled = {name: 0 for name in shapes}
    for name, row, index in rows:
        if name not in tensors:
            raise InteropError(f"missing tensor {name} (or {family.prefix}{name})")
        value, shape = tensors[name], tuple(dims[s] for s in row.shape)
        if value.shape != shape:
            raise InteropError(
                f"tensor {name} has shape {list(value.shape)}; config.json implies {list(shape)}"
            )
        value = np.asarray(value, np.float32)[_hf_slice(row, value.ndim)]
        if "V" in row.shape:  # pad the vocabulary with zero rows
            axis = row.shape.index("V")
            pad = [(0, 0)] * value.ndim
            pad[axis] = (0, cfg.vocab_size - hf_vocab)
            value = np.pad(value, pad)
        if row.linear:  # [..., out, in] -> [..., in, out]
            value = value.swapaxes(-1, -2)
        slot = params[row.ours][index]
        slot[...] = value.reshape(slot.shape)
        filled[row.ours] += slot.size
    unfilled = [name for name, n in filled.items() if n != math.prod(shapes[name])]
    assert not unfilled, f"{family.model_type}'s table leaves {unfilled} unset"
    out: dict = {}
    for name, value in params.items():
        _set(out, name, value)
    return out


def to_hf(params: dict, model: ModelConfig, family: Family, n_tokens: int) -> dict[str, np.ndarray]:
    """HF tensors (f32, named as the family's `...ForCausalLM` saves them) of gptjax
    parameters, the vocabulary trimmed to `n_tokens`."""
    dims = families.dims(model, model.vocab_size)
    out, f32 = {}, {}  # each parameter as f32 once (a bf16 run's: one copy, not one per row)
    for name, row, index in _rows(model, family):
        if row.ours not in f32:
            f32[row.ours] = np.asarray(_get(params, row.ours), np.float32)
        value = f32[row.ours][index]
        shape = [dims[s] for s in row.shape]
        if row.hf_slice is not None:  # this row fills every step-th column of the HF tensor
            axis, _, step = row.hf_slice
            shape[axis] //= step
        if row.linear:
            value = value.reshape(*shape[:-2], shape[-1], shape[-2]).swapaxes(-1, -2)
        else:
            value = value.reshape(shape)
        if "V" in row.shape:
            value = np.take(value, np.arange(n_tokens), axis=row.shape.index("V"))
        key = name if name == families.LM_HEAD else family.prefix + name
        if row.hf_slice is None:
            out[key] = np.ascontiguousarray(value)
        else:
            full = [dims[s] for s in row.shape]
            whole = out.setdefault(key, np.zeros(full, np.float32))
            whole[_hf_slice(row, len(full))] = value
    return out


# -- runs -------------------------------------------------------------------------------------


def import_run(directory: str | Path, run_dir: str | Path, overrides: list[str] = ()) -> Path:
    """A gptjax run at step 0 from a local HF directory of any family in hf_families;
    `overrides` (key=value) may set anything but the fields config.json decides (e.g.
    model.seq_len, train.*, optim.*, data.*)."""
    from gptjax import config
    from gptjax.interop import hf_tokenizer

    directory, run_dir = Path(directory), Path(run_dir)
    if not directory.is_dir():
        raise InteropError(f"{directory} is not a directory")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise InteropError(f"{run_dir} exists and is not empty; choose a new --run-dir")
    hf, family = read_config(directory)
    tokenizer = hf_tokenizer.load(directory)
    fixed, defaults = model_fields(hf, family, tokenizer.vocab_size)
    given = {item.split("=", 1)[0] for item in overrides}
    for key in fixed:
        if f"model.{key}" in given:
            raise ConfigError(f"model.{key} comes from {directory / 'config.json'}; drop it")
    for key in sorted(given):  # the MoE's training settings may be set, not its shape or routing
        if key.startswith("model.moe.") and "moe" in fixed and key not in MOE_TRAINING:
            raise ConfigError(
                f"{key} comes from {directory / 'config.json'}; drop it (of model.moe, only "
                f"{', '.join(k.removeprefix('model.moe.') for k in MOE_TRAINING)} may be set)"
            )
    fields = {**defaults, **fixed}
    dotted = [f"model.{key}={json.dumps(value)}" for key, value in fields.items()]
    base = [f"run_dir={run_dir}", "model.param_dtype=float32", *dotted]
    cfg = config.load(None, [*base, *overrides])
    tensors = read_tensors(directory, family.prefix)
    params = to_gptjax(tensors, cfg.model, hf["vocab_size"], family)
    return write_run(cfg, tokenizer, params, run_dir)


def write_run(cfg, tokenizer, params: dict, run_dir: str | Path) -> Path:
    """A run directory at step 0: config.yaml, the tokenizer, {params, fresh AdamW state}.
    Written next to the target and renamed when complete: never a half-written run."""
    import jax

    from gptjax.core import steps
    from gptjax.training import checkpoint, runs

    run_dir = Path(run_dir)
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
            run_dir.rmdir()  # empty (checked by the caller)
        scratch.rename(run_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return run_dir


def export_run(
    run_dir: str | Path, out: str | Path, step: int | None = None, model_type: str | None = None
) -> Path:
    """`out`/model.safetensors + config.json + the tokenizer, from a run's checkpoint, as the
    HF family that computes the run's model (or `model_type`; refused in one line if it cannot)."""
    from gptjax.training import runs

    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise InteropError(f"exporting to Hugging Face needs safetensors: {INSTALL_HINT}") from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} exists and is not an empty directory; choose a new --out")
    family = families.family_of_model(runs.read_config(Path(run_dir)).model, model_type)
    setup, params, tokenizer = runs.load_run(run_dir, step)
    model = setup.cfg.model
    n_tokens = tokenizer.vocab_size
    if n_tokens > model.vocab_size:
        raise InteropError(f"the tokenizer has {n_tokens} ids; model.vocab_size={model.vocab_size}")
    import jax

    return write_hf(out, model, family, jax.device_get(params), tokenizer)


def write_hf(out: Path, model: ModelConfig, family: Family, params: dict, tokenizer) -> Path:
    """model.safetensors + config.json + the tokenizer of gptjax `params` in `out`."""
    from safetensors.numpy import save_file

    from gptjax.interop import hf_tokenizer

    out = Path(out)
    tensors = to_hf(params, model, family, tokenizer.vocab_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InteropError(f"cannot create {out}: {error.strerror}") from None
    write = lambda scratch: save_file(tensors, str(scratch), metadata={"format": "pt"})
    atomic.write_with(out / "model.safetensors", write)
    config_json = hf_config(model, family, tokenizer.vocab_size, tokenizer.eod_id)
    atomic.write_file(out / "config.json", json.dumps(config_json, indent=2) + "\n")
    hf_tokenizer.save(tokenizer, out, model.n_positions)
    return out
