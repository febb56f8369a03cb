"""Run directories: create one for training, check a resume against it, load a trained one
for inference on whatever devices this process has, and export its weights.

A run directory holds config.yaml, its tokenizer (tokenizer.model: SentencePiece, or
tokenizer.json: byte-level BPE), metrics.jsonl, checkpoints/ (see README).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax import atomic, config
from gptjax.config import Config, ConfigError
from gptjax.core import model, quantize, steps
from gptjax.data import Dataset, load_dataset
from gptjax.data import tokenizer as tok
from gptjax.training import checkpoint
from gptjax.training.checkpoint import CheckpointError


def read_config(run_dir: str | Path) -> Config:
    """The run's saved config, its mesh reset to this process's devices (a run trained on any
    mesh or host count loads on one device)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config.load(run_dir / "config.yaml")
    return cfg.model_copy(update={"mesh": cfg.mesh.on_local_devices()})


def learned_chat(run_dir: str | Path) -> bool:
    """Whether a run was trained on conversations (its config's data sources: e.g. chitchat or
    chat:PATH), so that it has learned the chat template that `gptjax chat` speaks."""
    from gptjax.data import sources

    return sources.conversational(read_config(run_dir).data)


def load_run(
    run_dir: str | Path, step: int | None = None, devices=None, mesh=None, quant: str | None = None
):
    """(model setup, params, tokenizer) of a run_dir's newest (or given) checkpoint, on
    `devices` (default: one) with every device on `data`, or with `mesh` sizes ({"data": 2,
    "tensor": 4}) in place of that. Only the parameters are read: no optimiser is built and
    the optimiser state in the checkpoint is never restored. `quant` "int8": the matmul
    weights as int8 with per-channel scales (gptjax/core/quantize.py; the setup describes the
    quantised tree)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if mesh:
        cfg = cfg.model_copy(update={"mesh": cfg.mesh.model_copy(update=mesh)})
    setup = steps.build_model(cfg, devices or jax.devices()[:1])
    params = restore_params(run_dir, step, setup)
    setup, params = quantize.quantize_setup(setup, params, quant)
    return setup, params, tok.load(run_dir)


@contextlib.contextmanager
def new_or_existing(cfg: Config) -> Iterator[Path]:
    """The run directory for the `with` block (created, checked writable); when the block fails
    and leaves nothing in the directories this call created (a missing data file, say), they
    are removed again: a mistake leaves no empty run directory behind."""
    run_dir = Path(cfg.run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    path = prepare_run_dir(cfg)
    try:
        yield path
    except BaseException:
        for directory in created:
            try:
                directory.rmdir()  # only when empty: anything written stays
            except OSError:
                break
        raise


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"run_dir {run_dir} is not writable: {error.strerror}") from None
    return run_dir


def shape_changes(old: Config, new: Config) -> list[str]:
    """The parameters whose shapes differ between two configs (from the model's own shapes)."""
    a, b = model.param_shapes(old.model), model.param_shapes(new.model)
    return [
        f"{name} {list(a[name]) if name in a else 'absent'} -> "
        f"{list(b[name]) if name in b else 'absent'}"
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name)
    ]


def check_resume(run_dir: Path, cfg: Config) -> list[str]:
    """Refuse to resume a run whose saved config has different parameter shapes; return the
    other settings that changed (mesh, batch size, steps, schedule: allowed on resume)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = config.load(saved_path)
    except ConfigError as error:
        raise ConfigError(f"{saved_path}: {error}") from None
    differ = shape_changes(saved, cfg)
    before, after = config.flatten(saved.to_dict()), config.flatten(cfg.to_dict())
    if differ:
        keys = [
            f"{key} ({before.get(key)} -> {after.get(key)})"
            for key in sorted(set(before) | set(after))
            if key.startswith("model.") and before.get(key) != after.get(key)
        ]
        shown = "; ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ConfigError(
            f"{run_dir} holds a run with different parameter shapes: {', '.join(keys)} "
            f"({shown}); use a new run_dir"
        )
    if saved.optim.name != cfg.optim.name:  # the optimiser state has another structure
        raise ConfigError(
            f"{run_dir} was trained with optim.name={saved.optim.name}, whose optimiser state "
            f"optim.name={cfg.optim.name} cannot continue; use a new run_dir (with "
            f"train.init_from={run_dir} to start from its parameters)"
        )
    return [
        f"{key}: {before.get(key)} -> {after.get(key)}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def init_source(cfg: Config) -> tuple[Path, int | None]:
    """(run directory, step or None for its newest) of `train.init_from: RUN_DIR[@STEP]`,
    checked before anything is written: a run directory with a tokenizer and the same parameter
    shapes as `cfg` (the differing ones are listed)."""
    spec = cfg.train.init_from
    path, at, step = spec.rpartition("@")
    if not (at and step.isdigit()):
        path, step = spec, None
    source = Path(path)
    try:
        saved = read_config(source)
    except ConfigError as error:
        raise ConfigError(f"train.init_from={spec}: {error}") from None
    differ = shape_changes(saved, cfg)
    if differ:
        raise ConfigError(
            f"train.init_from={spec} has different parameter shapes: {'; '.join(differ)}; "
            f"set model.* as in {source / 'config.yaml'}"
        )
    if tok.find(source) is None:
        raise ConfigError(f"train.init_from={spec}: {source} holds no tokenizer")
    if cfg.data.tokenizer:
        raise ConfigError("train.init_from keeps the source run's tokenizer: remove data.tokenizer")
    return source, None if step is None else int(step)


def restore_params(run_dir: Path, step: int | None, setup: steps.ModelSetup) -> Any:
    """The parameters of `run_dir`'s checkpoint `step` (newest when None), on `setup`'s mesh;
    read-only: the run may be training (and saving) right now."""
    reader = checkpoint.Checkpointer(run_dir, async_save=False, read_only=True)
    try:
        return reader.restore_params(setup.abstract_params, step)
    finally:
        reader.close()


def score_held_out(
    run_dir: str | Path, step: int | None = None, batches: int = 0, quant: str | None = None
) -> dict:
    """A run's checkpoint (newest, or `step`) scored on its held-out text: every validation
    window, each once, whatever the batch size (the default), or its first `batches` batches of
    train.batch_size windows; `quant` as for load_run."""
    setup, params, _ = load_run(run_dir, step, quant=quant)
    cfg = setup.cfg
    data = load_data(cfg, Path(run_dir))
    eval_step = steps.make_eval_step(setup, data.token_bytes)
    size = cfg.train.batch_size
    windows = batches * size if batches else None
    result = steps.evaluate(setup, eval_step, params, data, batches or None, windows)
    sets = [part.data for part in getattr(data, "parts", ())] or [data]  # a mixture's sources
    read = sum(windows or len(one.val) for one in sets)
    result["eval_tokens"] = read * cfg.model.seq_len  # the held-out tokens read
    return result


def load_data(
    cfg: Config, run_dir: Path, progress: bool = False, tokenizer: Path | None = None
) -> Dataset:
    """The run's data (prepared first when not cached); a resumed run keeps the tokenizer saved
    in its run_dir, a new one uses `tokenizer` when given (init_from: the source's)."""
    tokenizer = tok.find(run_dir) or tokenizer
    data = load_dataset(cfg.data, cfg.model.seq_len, tokenizer, cfg.model.vocab_size, progress)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size"
        )
    return data


def mixture_table(cfg: Config, data) -> str | None:
    """GPT-3's table 2.2 for a mixture run (documents, tokens, weights, epochs in train.steps);
    None for one source."""
    if not hasattr(data, "parts"):
        return None
    from gptjax.data import mixture

    B = cfg.train.batch_size
    rows = data.table(cfg.seed, cfg.train.steps, B)
    return mixture.format_table(rows, data.phases, cfg.train.steps, B * cfg.model.seq_len)


def flatten(params: Any) -> dict[str, np.ndarray]:
    """{"blocks.qkv_w": array, ...}: the parameter tree as dotted names."""
    return {name: np.asarray(jax.device_get(a)) for name, a in model.by_name(params).items()}


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Consolidated parameters (params.npz, f32, dotted names) + config.yaml + the tokenizer."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new --out")
    if step is None and (run_dir / "config.yaml").is_file():  # record which step "newest" was
        reader = checkpoint.Checkpointer(run_dir, async_save=False, read_only=True)
        step = reader.latest_step()
        reader.close()
    setup, params, _ = load_run(run_dir, step)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {out}: {error.strerror}") from None
    # f32 for any float (bfloat16 parameters would need ml_dtypes to load)
    arrays = {
        name: a.astype(np.float32) if jax.dtypes.issubdtype(a.dtype, np.floating) else a
        for name, a in flatten(params).items()
    }
    atomic.write_with(out / "params.npz", lambda scratch: _savez(scratch, arrays))
    saved = tok.find(run_dir)
    atomic.write_file(out / saved.name, saved.read_bytes())
    atomic.write_file(out / "config.yaml", setup.cfg.to_yaml())
    meta = {"step": int(step) if step is not None else None, "source": str(run_dir.absolute())}
    atomic.write_file(out / "export.json", json.dumps(meta, indent=1))
    return out


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file, not a name: numpy would add ".npz" to a name
        np.savez(file, **arrays)
