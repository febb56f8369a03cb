"""Training behaviour: overfitting a fixed batch, step-indexed batches, resume, the run dir."""

import json
import os
import re

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_config

from gptjax import compile_cache, config
from gptjax.core import steps
from gptjax.data import load_dataset
from gptjax.training import loop


def test_overfits_a_fixed_batch(tmp_path, cache_dir):
    overrides = ("optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant")
    cfg = tiny_config(tmp_path, cache_dir, *overrides)
    data = load_dataset(cfg.data, cfg.model.seq_len)
    batch = data.train_batch(cfg.seed, 0, cfg.train.batch_size, 0, cfg.train.batch_size)
    setup = steps.build(cfg, jax.devices()[:1])
    state = steps.init_state(setup)
    step = steps.make_train_step(setup)
    losses = []
    for _ in range(60):
        state, stats = step(state, batch)
        losses.append(float(stats["loss"]))
    assert losses[0] == pytest.approx(np.log(cfg.model.vocab_size), rel=0.05)  # uniform at init
    assert losses[-1] < 0.25 * losses[0]


def test_batches_depend_only_on_seed_and_step(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir)
    first = load_dataset(cfg.data, cfg.model.seq_len)
    second = load_dataset(cfg.data, cfg.model.seq_len)  # a separate load, as in another run
    for step in (0, 7, 10_000):
        a = first.train_rows(cfg.seed, step, 8, 0, 8)
        np.testing.assert_array_equal(a, second.train_rows(cfg.seed, step, 8, 0, 8))
        np.testing.assert_array_equal(a[2:6], second.train_rows(cfg.seed, step, 8, 2, 6))
    assert not np.array_equal(first.train_rows(0, 3, 8, 0, 8), first.train_rows(1, 3, 8, 0, 8))


def read_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = {r["step"]: r for r in lines if "loss" in r}
    eval_lines = {r["step"]: r for r in lines if "eval_loss" in r}
    return train_lines, eval_lines


def test_train_writes_run_dir_and_resume_continues_exactly(tmp_path, cache_dir):
    overrides = ("train.steps=12", "train.log_every=1", "checkpoint.every=6", "train.eval_every=6")
    straight = tiny_config(tmp_path / "straight", cache_dir, *overrides)
    loop.train(straight, progress=False)
    run = tmp_path / "straight"
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl"):
        assert (run / name).is_file()
    assert list((run / "tensorboard").iterdir())
    assert config.load(run / "config.yaml") == straight
    steps, evals = read_metrics(run)
    assert sorted(steps) == list(range(1, 13)) and sorted(evals) == [6, 12]
    record = steps[12]
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert set(evals[12]) >= {"eval_loss", "eval_bpb"}

    stopped = tiny_config(tmp_path / "resumed", cache_dir, *overrides, "train.stop_at=6")
    assert loop.train(stopped, progress=False)["final_step"] == 6
    resumed = tiny_config(tmp_path / "resumed", cache_dir, *overrides)
    loop.train(resumed, progress=False)
    again, _ = read_metrics(tmp_path / "resumed")
    for s in range(7, 13):
        assert again[s]["loss"] == pytest.approx(steps[s]["loss"], rel=1e-6), s


def test_cli_train_sample_eval_end_to_end(tmp_path, cache_dir):
    run = tmp_path / "run"
    env = {"GPTJAX_CACHE": str(cache_dir)}
    result = run_cli("train", "configs/debug.yaml", f"run_dir={run}", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 20 and np.isfinite(summary["eval_loss"])

    # Every program cached however fast it compiled, so the second start has nothing to write.
    cached = {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    args = ("sample", str(run), "--prompt", "import ", "--max-new-tokens", "20")
    sample = run_cli(*args, env=cached)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("import ") and len(sample.stdout) > len("import \n")
    programs = sorted(p.name for p in compile_cache.directory(cache_dir).iterdir())
    assert any(name.startswith("jit_") for name in programs)  # the commands use the cache
    again = run_cli(*args, env=cached)
    assert again.stdout == sample.stdout  # programs read back from the cache compute the same
    assert sorted(p.name for p in compile_cache.directory(cache_dir).iterdir()) == programs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nclass \n")
    batch = run_cli(
        "sample", str(run), "--prompt-file", str(prompts), "--num-samples", "2",
        "--max-new-tokens", "8", "--devices", "4", "--tensor", "2", env=env,
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    parts = re.split(r"^--- (prompt \d+, sample \d+) ---\n", batch.stdout, flags=re.M)
    assert parts[0] == "" and parts[1::2] == [
        "prompt 1, sample 1", "prompt 1, sample 2", "prompt 2, sample 1", "prompt 2, sample 2"
    ]  # fmt: skip
    assert [s[:4] for s in parts[2::2]] == ["def ", "def ", "clas", "clas"]

    evaluated = run_cli("eval", str(run), env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["eval_ppl"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-6)
    assert 0 < metrics["eval_bpb"] < 8

    missing = run_cli("sample", str(tmp_path / "nothing"), env=env)
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


def test_resume_with_other_shapes_is_refused_and_nothing_overwritten(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir, "train.steps=2", "train.eval_every=0")
    loop.train(cfg, progress=False)
    saved = (tmp_path / "config.yaml").read_text()
    result = run_cli(
        "train",
        str(ROOT / "configs" / "debug.yaml"),
        f"run_dir={tmp_path}",
        f"data.cache_dir={cache_dir}",
        "model.d_model=128",
    )
    assert result.returncode == 2
    assert "different parameter shapes: model.d_model (64 -> 128)" in result.stderr
    assert (tmp_path / "config.yaml").read_text() == saved


def test_compile_cache_is_per_machine_kind_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("GPTJAX_COMPILE_CACHE", "off")
    assert compile_cache.enable(tmp_path) is None
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    monkeypatch.setenv("GPTJAX_COMPILE_CACHE", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable(tmp_path) == tmp_path / "mine"  # the user's own setting wins
    assert compile_cache.directory(tmp_path).parent == tmp_path / "xla"
    assert compile_cache.directory(tmp_path).name == compile_cache.machine_key()
