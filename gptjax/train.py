"""The training loop: the only module that knows about everything.

TrainState is a plain pytree {"params", "opt_state", "step"}. `train_step` is a pure function,
jitted once with explicit shardings and the state donated; gradient accumulation is a `lax.scan`
over micro-batches inside it. Batches are built per device from the step index alone.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptjax import checkpoint, debug, distributed, metrics, model, optim, sharding
from gptjax import loss as vocab_loss
from gptjax.config import Config, ConfigError, shape_keys
from gptjax.data import Dataset, load_dataset
from gptjax.data import loader as data_loader
from gptjax.faults import NonFiniteSteps, PreemptionGuard


@dataclass
class Setup:
    """Everything derived from the config before any array exists."""

    cfg: Config
    mesh: jax.sharding.Mesh
    rules: dict
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any  # pytree of NamedSharding matching TrainState
    abstract_state: Any  # pytree of ShapeDtypeStruct (with shardings)
    batch_sharding: NamedSharding  # [batch, seq + 1] tokens

    def activate(self):
        return sharding.activate(self.mesh, self.rules)


def build(cfg: Config, devices: list[jax.Device] | None = None) -> Setup:
    """Mesh, shardings and the abstract TrainState; errors here happen before compiling."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.make_rules(cfg.mesh.rules)
    graphdef, abstract_params = model.abstract(cfg.model)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    param_specs = jax.tree.map(
        lambda names: sharding.logical_to_spec(tuple(names), rules),
        logical,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    param_axes = sharding.check_parameters(shapes, logical, rules, mesh)
    batch_axes = sharding.check_batch(cfg.train.batch_size, cfg.train.micro_batches, rules, mesh)
    sharding.warn_idle_axes(mesh, param_axes, batch_axes)
    batch_spec = sharding.logical_to_spec(("batch", None), rules)

    schedule = optim.schedule(cfg.optim, cfg.train.steps)
    optimizer = optim.make(cfg.optim, cfg.train.steps)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        opt_shapes,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=is_spec,
    )
    specs = {"params": param_specs, "opt_state": opt_specs, "step": PartitionSpec()}
    state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    shapes_tree = {
        "params": shapes,
        "opt_state": opt_shapes,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes_tree,
        state_shardings,
    )
    return Setup(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        graphdef=graphdef,
        optimizer=optimizer,
        schedule=schedule,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        batch_sharding=NamedSharding(mesh, batch_spec),
    )


def init_state(setup: Setup) -> dict[str, Any]:
    """Parameters and optimiser state created directly in their shards."""
    cfg = setup.cfg

    def init():
        params = model.init_params(cfg.model, cfg.seed)
        return {
            "params": params,
            "opt_state": setup.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    with setup.activate():
        return jax.jit(init, out_shardings=setup.state_shardings)()


def token_losses(graphdef, params, tokens_BT1, key=None) -> jax.Array:
    """Per-token cross-entropy [B, T] (nats, f32) of predicting tokens[:, 1:] from [:, :-1]."""
    gpt = nnx.merge(graphdef, params)
    h_BTD = gpt.hidden(tokens_BT1[:, :-1], key)
    # model.loss_chunk > 0: never hold the full [B, T, V] f32 logits (gptjax/loss.py)
    return vocab_loss.token_losses(h_BTD, gpt.head(), tokens_BT1[:, 1:], gpt.cfg.loss_chunk)


def loss_and_grads(graphdef, params, batch_BT1, micro_batches: int, key=None):
    """Mean token loss and its gradient over the batch, accumulated over micro-batches.

    Micro-batch m takes rows m, m+M, m+2M, ... so every device holds part of every one; the
    micro-batches run in a `lax.scan` and the gradient is summed in f32.
    """
    B, T1 = batch_BT1.shape
    micro_MBT1 = batch_BT1.reshape(B // micro_batches, micro_batches, T1).swapaxes(0, 1)

    def loss_fn(params, tokens, key):
        return token_losses(graphdef, params, tokens, key).mean()

    def accumulate(carry, xs):
        loss_sum, grad_sum = carry
        index, tokens = xs
        tokens = sharding.constrain(tokens, ("batch", None))
        sub_key = None if key is None else jax.random.fold_in(key, index)
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, sub_key)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(
        accumulate,
        (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(micro_batches), micro_MBT1),
    )
    return loss / micro_batches, jax.tree.map(lambda g: g / micro_batches, grads)


def make_train_step(setup: Setup):
    """jit(state, batch [B, T+1]) -> (state, metrics); the state is donated."""
    cfg, graphdef = setup.cfg, setup.graphdef
    use_dropout = cfg.model.dropout > 0

    def step_fn(state, batch_BT1):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"]) if use_dropout else None
        loss, grads = loss_and_grads(graphdef, params, batch_BT1, cfg.train.micro_batches, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], params)
        # A non-finite loss or gradient skips the update (the step still advances, so the data
        # moves on): the state stays finite and is safe to checkpoint.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = {
            "params": jax.tree.map(keep, optax.apply_updates(params, updates), params),
            "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
        }
        stats = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": setup.schedule(state["step"]),
            "skipped": (~finite).astype(jnp.int32),
        }
        return new_state, stats

    jitted = jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )

    def run(state, batch):
        with setup.activate():
            return jitted(state, batch)

    run.jitted = jitted  # for ahead-of-time lowering (gptjax plan); lower under setup.activate()
    return run


def make_eval_step(setup: Setup, token_bytes: np.ndarray):
    """jit(params, batch) -> (sum of token losses in nats, tokens scored, UTF-8 bytes scored)."""
    table = np.zeros(setup.cfg.model.vocab_size, np.float32)
    table[: len(token_bytes)] = token_bytes

    def eval_fn(params, batch_BT1):
        losses = token_losses(setup.graphdef, params, batch_BT1)
        n_bytes = jnp.asarray(table)[batch_BT1[:, 1:]].sum()
        return losses.sum(), jnp.asarray(losses.size, jnp.float32), n_bytes

    jitted = jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], setup.batch_sharding))

    def run(params, batch):
        with setup.activate():
            return jitted(params, batch)

    return run


def global_batch(setup: Setup, rows_fn, batch_size: int) -> jax.Array:
    """Assemble the [batch_size, T+1] global batch; each process reads only its own rows once,
    rows_fn(start, stop) -> int32 [stop - start, T+1] (see gptjax/data/loader.py)."""
    shape = (batch_size, setup.cfg.model.seq_len + 1)
    return data_loader.assemble(setup.batch_sharding, shape, rows_fn)


def evaluate(setup: Setup, eval_step, params, data: Dataset, n_batches: int) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over `n_batches` fixed batches."""
    batch_size = setup.cfg.train.batch_size
    totals = np.zeros(3)
    for k in range(n_batches):
        batch = global_batch(
            setup, lambda a, b, k=k: data.val_rows(k, batch_size, a, b), batch_size
        )
        totals += np.array([float(x) for x in eval_step(params, batch)])
    loss_sum, tokens, n_bytes = totals
    loss = loss_sum / tokens
    return {
        "eval_loss": float(loss),
        "eval_ppl": float(math.exp(min(loss, 700))),
        "eval_bpb": float(loss_sum / (math.log(2) * n_bytes)),
    }


def check_resume(run_dir: Path, cfg: Config) -> list[str]:
    """Refuse to resume a run whose saved config has different parameter shapes; return the
    other settings that changed (mesh, batch size, steps, schedule: allowed on resume)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    from gptjax import config as config_module

    try:
        saved = config_module.load(saved_path)
    except ConfigError as error:
        raise ConfigError(f"{saved_path}: {error}") from None
    old, new = shape_keys(saved), shape_keys(cfg)
    differ = [f"{k} ({old[k]} -> {new[k]})" for k in old if old[k] != new[k]]
    if differ:
        raise ConfigError(
            f"{run_dir} holds a run with different parameter shapes: {', '.join(differ)}; "
            "use a new run_dir"
        )
    before, after = _flat(saved.to_dict()), _flat(cfg.to_dict())
    return [
        f"{key}: {before.get(key)} -> {after.get(key)}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rules":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def load_data(cfg: Config, run_dir: Path, progress: bool = False) -> Dataset:
    """The run's data (prepared first when not cached); a resumed run keeps the tokenizer saved
    in its run_dir."""
    saved = run_dir / "tokenizer.model"
    tokenizer = saved if saved.is_file() else None
    data = load_dataset(cfg.data, cfg.model.seq_len, tokenizer, cfg.model.vocab_size, progress)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size"
        )
    return data


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in cfg.run_dir; returns the last train and eval metrics."""
    cfg = debug.apply(cfg)  # --debug: one device
    distributed.initialize(cfg)  # several processes: join them (before any device is touched)
    with debug.session(cfg):  # debug flags and the step watchdog
        return _train(cfg, progress)


class Profiler:
    """`train.profile_steps=[a, b]`: a JAX profiler trace of steps a..b into run_dir/profile."""

    def __init__(self, steps: list[int] | None, directory: Path):
        self.steps, self.directory, self.tracing = steps, directory, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps[1]:
            self.close(state)

    def close(self, state) -> None:
        if self.tracing:  # also when the run ends inside the profiled steps
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False


def _train(cfg: Config, progress: bool) -> dict[str, Any]:
    setup = build(cfg, debug.devices(cfg))  # config/mesh errors first, before touching the disk
    run_dir = prepare_run_dir(cfg)
    changed = check_resume(run_dir, cfg)
    lead = jax.process_index() == 0
    if changed and lead:
        print(f"gptjax: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
    data = load_data(cfg, run_dir, progress=progress and lead)
    if lead:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if not (run_dir / "tokenizer.model").is_file():
            data.tokenizer.save(run_dir / "tokenizer.model")

    ckpt = checkpoint.Checkpointer(
        run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_, cfg.checkpoint.keep_period
    )
    restored = ckpt.restore_newest_valid(setup.abstract_state)
    if restored is None:
        state, start = init_state(setup), 0
    else:
        start, state = restored
        if lead:
            print(f"gptjax: resumed {run_dir} at step {start}", file=sys.stderr)
    monitor = debug.StepMonitor(cfg, setup, lead)  # watchdog; debug timings and NaN checks
    train_step = monitor.wrap(make_train_step(setup))
    eval_step = monitor.wrap(make_eval_step(setup, data.token_bytes), "eval")

    B = cfg.train.batch_size
    log = metrics.StepLogger(
        metrics.MetricsWriter(run_dir, enabled=lead),
        tokens_per_step=B * cfg.model.seq_len,
        flops_per_token=metrics.flops_per_token(cfg.model),
        peak_flops=metrics.peak_flops(list(setup.mesh.devices.flat))[0],
        log_every=cfg.train.log_every,
        total_steps=cfg.train.steps,
        start_step=start,
        progress=progress and lead,
    )
    bad_steps = NonFiniteSteps(cfg.train.max_bad_steps)

    def batch_for(step):
        return global_batch(setup, lambda a, b: data.train_rows(cfg.seed, step, B, a, b), B)

    # Steps step+1 .. step+prefetch are read and transferred while step `step` runs.
    batches = data_loader.Prefetcher(batch_for, cfg.data.prefetch, stop=cfg.train.steps)

    def report(step, stats):
        """Log a step's numbers (read one step late, so the device never waits on the host)."""
        record = {k: float(v) for k, v in stats.items()}
        for line in bad_steps.update(step, bool(record.pop("skipped"))):
            log.say(line)
        log.train(step, {**record, "bad_steps": bad_steps.total})

    profiler = Profiler(cfg.train.profile_steps, run_dir / "profile")
    guard = PreemptionGuard(sync_every=cfg.train.log_every)
    pending = None  # (step, stats) of the step dispatched before the current one
    try:
        guard.install()
        # train.stop_at: end early (with a checkpoint) on the schedule of all train.steps
        end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
        for step in range(start, end):
            done = step + 1  # steps are numbered by the updates completed, as in metrics.jsonl
            monitor.begin(step)
            profiler.before(done)
            state, stats = train_step(state, batches.get(step))
            if step == start:  # the first call compiled synchronously: keep that out of tokens/s
                log.restart_window()
            profiler.after(done, state)
            if pending is not None:  # read step n-1's numbers while step n runs
                report(*pending)
            pending = (done, stats)
            log.dispatched()
            is_last = done == cfg.train.steps
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or is_last:
                report(*pending)
                pending = None
                log.eval(
                    done, evaluate(setup, eval_step, state["params"], data, cfg.train.eval_steps)
                )
            stop = guard.should_stop(done) or done == cfg.train.stop_at
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or is_last or stop:
                ckpt.save(done, state, cfg.to_dict())
            if stop:
                ckpt.wait()
                log.say(
                    f"gptjax: stopped at step {done}; checkpoint saved, run the same command "
                    "to resume"
                )
                log.last["preempted"] = True
                break
        if pending is not None:
            report(*pending)
        profiler.close(state)
    finally:
        batches.close()
        monitor.close()
        ckpt.close()  # waits for an asynchronous save in flight
        guard.uninstall()  # only now: a stop signal must not cut that save short
        log.close()
    last = log.last
    last["final_step"] = int(jax.device_get(state["step"]))
    return last
