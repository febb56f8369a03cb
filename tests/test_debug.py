"""gptjax/training/debug.py: `--debug` runs any config on one device, finds the op and step of a
NaN, times each step, and `debug.no_jit` runs the model eagerly (for pdb)."""

import contextlib
import io
import json
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import tiny_config
from flax import nnx

from gptjax import cli
from gptjax.config import ConfigError
from gptjax.core import flops, model, steps
from gptjax.data import loader as data_loader
from gptjax.data import pipeline
from gptjax.training import checkpoint, debug, loop, metrics, monitor

DEBUG = ["debug.enabled=true", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0"]


def losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def run_captured(cfg) -> tuple[dict, str]:
    """train.train(cfg) with its stderr and JAX's log records captured as one text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    gptjax_log = logging.getLogger("gptjax")
    level = gptjax_log.level
    gptjax_log.setLevel(logging.INFO)  # as the CLI sets it
    for name in ("jax", "gptjax"):
        logging.getLogger(name).addHandler(handler)
    try:
        with contextlib.redirect_stderr(stream):
            result = loop.train(cfg, progress=False)
    except Exception as error:
        error.output = stream.getvalue()
        raise
    finally:
        for name in ("jax", "gptjax"):
            logging.getLogger(name).removeHandler(handler)
        gptjax_log.setLevel(level)
    return result, stream.getvalue()


MARK = 7  # token id that fills row 0 of the poisoned step's batch


def poison(monkeypatch, step: int) -> None:
    """Row 0 of `step`'s batch (1-based) is all MARK; the model adds log(-1) to marked rows."""
    rows, hidden = pipeline.Dataset.train_rows, model.GPT.hidden_and_aux

    def marked_rows(self, seed, index, batch_size, start, stop):
        out = rows(self, seed, index, batch_size, start, stop)
        if index == step - 1 and start == 0:
            out = out.copy()
            out[0] = MARK
        return out

    def poisoned(self, tokens, key=None, **where):  # the training loss's forward pass
        marked = jnp.all(tokens == MARK, axis=1)
        out, aux = hidden(self, tokens, key, **where)
        return out + jnp.log(jnp.where(marked, -1.0, 1.0))[:, None, None], aux

    monkeypatch.setattr(pipeline.Dataset, "train_rows", marked_rows)
    monkeypatch.setattr(model.GPT, "hidden_and_aux", poisoned)


NAN_STEP = 4


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, cache_dir):
    """A config whose mesh needs 16 devices (this process has 8), run with --debug; step 4
    produces a NaN."""
    run_dir = tmp_path_factory.mktemp("debug")
    cfg = tiny_config(run_dir, cache_dir, *DEBUG, "mesh.fsdp=16", "train.steps=6")
    with pytest.MonkeyPatch.context() as monkeypatch:
        poison(monkeypatch, NAN_STEP)
        with pytest.raises(monitor.NonFiniteError) as caught:
            run_captured(cfg)
    return cfg, run_dir, caught.value, caught.value.output


def test_any_config_runs_on_one_device(nan_run):
    cfg, run_dir, _, output = nan_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["mesh"]["data"], saved["mesh"]["fsdp"], saved["mesh"]["tensor"]) == (1, 1, 1)
    assert f"debug: one device ({jax.local_devices()[0]})" in output
    assert losses(run_dir) and all(np.isfinite(losses(run_dir)))
    # The flags are scoped to the run: nothing leaks into the rest of this process.
    assert not jax.config.jax_debug_nans and not jax.config.jax_log_compiles


def test_nan_is_traced_to_its_op_and_step(nan_run):
    _, run_dir, error, _ = nan_run
    message = str(error)
    assert message.startswith(f"step {NAN_STEP}: invalid value (nan) encountered in log")
    assert "tests/test_debug.py:" in message and "(poisoned)" in message  # the line that made it
    assert len(losses(run_dir)) < NAN_STEP  # it stopped there


def test_parameter_table_lists_every_parameter(nan_run):
    cfg, _, _, output = nan_run
    total = flops.param_counts(cfg.model)["params"]
    assert f"{total:,} (" in output.split("\ntotal")[1].splitlines()[0]
    _, abstract = model.abstract(cfg.model)
    shapes = {
        jax.tree_util.keystr(path, simple=True, separator="."): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
    }
    rows = {line.split()[0]: line for line in output.splitlines() if line.split()}
    for name, shape in shapes.items():
        assert name in rows and str(tuple(shape)) in rows[name] and "float32" in rows[name]
    assert "P(" in rows["wte"]  # the sharding spec column


def test_compilations_and_step_times_are_reported(nan_run):
    _, _, _, output = nan_run
    assert "INFO:gptjax.compile:Compiling jit(step_fn)" in output  # information, gptjax's
    assert "WARNING:jax" not in output
    for step in range(1, NAN_STEP):
        assert f"debug: step {step}: wall " in output
    assert "(includes compilation)" in output.split("debug: step 1:")[1].splitlines()[0]
    parts = step_times(output)[2]
    assert parts["device"] > 0 and parts["data"] >= 0 and parts["host"] >= 0


def step_times(output: str) -> dict[int, dict[str, float]]:
    """step -> {"wall", "data", "device", "eval", "checkpoint", "host"} in ms, from the
    `debug: step N: wall W ms = data a + device b + ... ms` lines."""
    found = {}
    for step, wall, split in re.findall(r"debug: step (\d+): wall ([\d.]+) ms = (.*) ms", output):
        parts = {name: float(value) for name, value in re.findall(r"(\w+) (-?[\d.]+)", split)}
        found[int(step)] = {"wall": float(wall), **parts}
    return found


def test_step_times_add_up_to_the_wall_time(tmp_path, cache_dir, monkeypatch):
    """Known delays land in their part of the step's split; each step's parts add up to its
    wall time, and the run's account (before the steps + steps + after) to the time an outer
    timer measures around train.train."""
    delay = {"data": 0.03, "device": 0.05, "eval": 0.1, "checkpoint": 0.07, "host": 0.02}  # s

    def slow(original, part="device"):
        def slowed(*args, **kwargs):
            time.sleep(delay[part])
            return original(*args, **kwargs)

        return slowed

    def slowed(owner, name, part):
        monkeypatch.setattr(owner, name, slow(getattr(owner, name), part))

    slowed(data_loader.Prefetcher, "get", "data")  # the loop waits for the batch
    make_train_step = steps.make_train_step
    monkeypatch.setattr(
        steps,
        "make_train_step",
        lambda setup, objective=None: slow(make_train_step(setup, objective)),
    )
    slowed(steps, "evaluate", "eval")
    slowed(checkpoint.Checkpointer, "save", "checkpoint")
    slowed(metrics.StepLogger, "dispatched", "host")  # the progress bar, once per step
    overrides = ["train.steps=6", "train.eval_every=3", "train.eval_steps=1", "checkpoint.every=2"]
    cfg = tiny_config(tmp_path, cache_dir, *DEBUG, *overrides)
    start = time.perf_counter()
    _, output = run_captured(cfg)
    outer = time.perf_counter() - start

    times = step_times(output)
    assert sorted(times) == [1, 2, 3, 4, 5, 6]
    for step, t in times.items():
        # printed to 0.1 ms: six roundings of up to 0.05 ms
        assert sum(t[p] for p in monitor.PARTS) == pytest.approx(t["wall"], abs=0.3), step
        assert t["data"] >= 1e3 * delay["data"], step
        assert t["device"] >= 1e3 * delay["device"], step
        assert (t["eval"] >= 1e3 * delay["eval"]) if step % 3 == 0 else t["eval"] == 0, step
        saved = t["checkpoint"] >= 1e3 * delay["checkpoint"]
        assert saved if step % 2 == 0 else t["checkpoint"] == 0, step
        assert t["host"] >= 1e3 * delay["host"], step
    # The totals are the sums of the steps (to the printed precision).
    total = re.search(r"debug: 6 steps: wall ([\d.]+) s = (.*) s \(step 1", output)
    totals = dict((n, float(v)) for n, v in re.findall(r"(\w+) (-?[\d.]+)", total[2]))
    for part in monitor.PARTS:
        assert totals[part] == pytest.approx(sum(t[part] for t in times.values()) / 1e3, abs=2e-3)
    loop = float(total[1])
    assert loop == pytest.approx(sum(t["wall"] for t in times.values()) / 1e3, abs=2e-3)
    # The run's account covers what the outer timer saw, but for the few calls train.train
    # makes before its debug session starts (config checks) and the print itself.
    run = re.search(
        r"debug: wall ([\d.]+) s = before the first step ([\d.]+) s .* \+ steps "
        r"([\d.]+) s \+ after the last step ([\d.]+) s",
        output,
    )
    wall, before, in_steps, after = (float(x) for x in run.groups())
    assert before + in_steps + after == pytest.approx(wall, abs=2e-3)
    assert in_steps == pytest.approx(loop, abs=2e-3)
    assert wall <= outer + 1e-3 and outer - wall < 0.25 + 0.05 * outer

    # Throughput counts the steps that completed inside each window: no step takes less than
    # the device delay, so no window can exceed one step's tokens per delay (a window that
    # counted a step run before it began, as debug mode's late reading once did, would).
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [line for line in lines if "tokens_per_s" in line]
    assert [line["step"] for line in rates] == [2, 3, 4, 5, 6]  # step 1 compiled: no window
    tokens = cfg.train.batch_size * cfg.model.seq_len
    peak = flops.peak_flops(jax.devices()[:1], cache_dir)[0]  # as train.train found it
    for line in rates:
        assert line["tokens_per_s"] <= tokens / delay["device"], line
        achieved = line["tokens_per_s"] * flops.flops_per_token(cfg.model)
        assert line["mfu"] == pytest.approx(achieved / peak, rel=1e-6)


def concrete(x) -> bool:
    """A value, not a jit placeholder: plain arrays, or autodiff tracers around one."""
    while isinstance(x, jax.core.Tracer) and hasattr(x, "primal"):
        x = x.primal
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def test_no_jit_runs_eagerly_and_stops_at_the_op(nan_run, tmp_path, cache_dir, monkeypatch):
    """debug.no_jit: the model sees concrete values (pdb-able), the forward pass matches the
    jitted one, and a NaN stops the run right at the op."""
    _, jit_dir, _, _ = nan_run
    poison(monkeypatch, 3)
    seen, hidden = [], model.GPT.hidden_and_aux

    def spying(self, tokens, key=None, **where):
        out, aux = hidden(self, tokens, key, **where)
        seen.append(concrete(out))
        return out, aux

    monkeypatch.setattr(model.GPT, "hidden_and_aux", spying)
    cfg = tiny_config(tmp_path, cache_dir, *DEBUG, "debug.no_jit=true", "train.steps=6")
    with pytest.raises(monitor.NonFiniteError, match=r"^step 3: invalid value \(nan\) encountered"):
        run_captured(cfg)
    assert seen and all(seen)
    assert losses(tmp_path)[0] == pytest.approx(losses(jit_dir)[0], rel=1e-5)  # step 1


def test_finiteness_check_names_the_step():
    cfg = tiny_config("unused", "unused", "debug.enabled=true")
    watch = monitor.StepMonitor(cfg)
    step = watch.wrap(lambda state, batch: (state, {"loss": jnp.float32(np.inf)}))
    watch.begin(0)
    with pytest.raises(monitor.NonFiniteError, match=r"step 1: non-finite \{'loss': inf\}"):
        step(jnp.zeros(()), jnp.zeros(()))


def test_debug_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("GPTJAX_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("GPTJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("GPTJAX_PROCESS_ID", "0")
    with pytest.raises(ConfigError, match="one process on one device"):
        debug.apply(tiny_config("unused", "unused", "debug.enabled=true"))


def test_cli_debug_flag_turns_debug_on(monkeypatch, capsys):
    got = []
    monkeypatch.setattr(loop, "train", lambda cfg, progress, **_: got.append(cfg) or {"ok": 1})
    assert cli.main(["train", "configs/debug.yaml", "--debug", "debug.no_jit=true"]) == 0
    assert got[0].debug.enabled and got[0].debug.no_jit
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
