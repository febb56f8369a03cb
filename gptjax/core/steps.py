"""The step library: everything needed to run the model on a mesh, without the training loop.

`build` turns a config into a `Setup` (mesh, shardings, abstract state, optimiser) before any
array exists; `build_model` into a `ModelSetup` (the model on a mesh, no optimiser: what
inference loads parameters onto); `make_train_step` and `make_eval_step` jit the pure step
functions with explicit shardings. `sample`, `eval`, `plan`, `bench`, the sweep and chat commands
import this module; only `gptjax/training/loop.py` (the loop) adds data, checkpoints and logging
around it.

TrainState is a plain pytree {"params", "opt_state", "step"}. A batch is a dict of [B, T] int32
arrays (gptjax/data/batching.py). The loss is a masked sum over the scored tokens divided by their
count over the whole global batch, so it is the exact mean however the scored tokens fall
across micro-batches and devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptjax.config import Config, ModelConfig
from gptjax.core import distill, expert_parallel, model, moe, optim, platform, sharding, vocab_loss
from gptjax.data import batching
from gptjax.data import loader as data_loader


@dataclass
class ModelSetup:
    """The model on a mesh, before any array exists: what inference needs (sample, eval, chat,
    serve, export). No optimiser and no training batch: `train.batch_size` is not checked."""

    cfg: Config
    mesh: jax.sharding.Mesh
    rules: dict
    graphdef: nnx.GraphDef
    param_shardings: Any  # pytree of NamedSharding matching the parameters
    abstract_params: Any  # pytree of ShapeDtypeStruct (with shardings)
    batch_sharding: NamedSharding  # every [batch, seq] array of a batch dict
    # cfg.model with the platform's choices made for the mesh's devices (model.attention auto ->
    # xla or cudnn): what the graph is built with; cfg itself stays as the user wrote it
    model_cfg: ModelConfig

    def activate(self):
        return sharding.activate(self.mesh, self.rules)

    @property
    def batch_shardings(self) -> dict[str, NamedSharding]:
        return {key: self.batch_sharding for key in batching.KEYS}

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The step's input as shapes: [batch_size, seq_len] int32 per key, sharded."""
        shape = (batch_size or self.cfg.train.batch_size, self.cfg.model.seq_len)
        return {
            key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for key in batching.KEYS
        }


@dataclass
class Setup(ModelSetup):
    """A ModelSetup with the optimiser and the whole TrainState: what training needs."""

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any  # pytree of NamedSharding matching TrainState
    abstract_state: Any  # pytree of ShapeDtypeStruct (with shardings)


def _model_on_mesh(cfg: Config, devices) -> tuple[ModelSetup, Any, set[str], nnx.State]:
    """(the model setup, the parameter specs, the mesh axes that shard a parameter, the
    parameters' abstract nnx state)."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.make_rules(cfg.mesh.rules, expert=mesh.shape["expert"] > 1)
    model_cfg = platform.resolve(cfg.model, list(mesh.devices.flat))
    graphdef, abstract_params = model.abstract(model_cfg)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    param_specs = jax.tree.map(
        lambda names: sharding.logical_to_spec(tuple(names), rules),
        logical,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    expert_parallel.check(model_cfg, mesh, rules)
    param_axes = sharding.check_parameters(shapes, logical, rules, mesh)
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs, is_leaf=_is_spec)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, param_shardings
    )
    batch_spec = sharding.logical_to_spec(("batch", None), rules)
    setup = ModelSetup(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        graphdef=graphdef,
        param_shardings=param_shardings,
        abstract_params=abstract,
        batch_sharding=NamedSharding(mesh, batch_spec),
        model_cfg=model_cfg,
    )
    return setup, param_specs, param_axes, abstract_params


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def build_model(cfg: Config, devices: list[jax.Device] | None = None) -> ModelSetup:
    """Mesh, rules, graph and parameter shardings for inference; errors before compiling."""
    setup, _, param_axes, _ = _model_on_mesh(cfg, devices)
    sharding.warn_idle_axes(setup.mesh, param_axes, sharding.batch_axes(setup.rules, setup.mesh))
    return setup


def build(cfg: Config, devices: list[jax.Device] | None = None) -> Setup:
    """Mesh, shardings and the abstract TrainState; errors here happen before compiling."""
    base, param_specs, param_axes, abstract_params = _model_on_mesh(cfg, devices)
    mesh = base.mesh
    batch_axes = sharding.check_batch(
        cfg.train.batch_size, cfg.train.micro_batches, base.rules, mesh
    )
    sharding.warn_idle_axes(mesh, param_axes, batch_axes)
    rows = cfg.train.batch_size // cfg.train.micro_batches
    expert_parallel.check(base.model_cfg, mesh, base.rules, rows * cfg.model.seq_len)

    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    schedule = optim.schedule(cfg.optim, cfg.train.steps, tokens_per_step)
    decay = model.declared(abstract_params, "decay")
    axes = model.declared(abstract_params, "out_sharding")
    optimizer = optim.make(cfg.optim, cfg.train.steps, decay, tokens_per_step, axes)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base.abstract_params)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # optim.name=muon's partition
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda x, spec: x if masked(x) else spec,
        opt_shapes,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: _is_spec(x) or masked(x),
    )
    specs = {"params": param_specs, "opt_state": opt_specs, "step": PartitionSpec()}
    state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
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
    fields = {name: getattr(base, name) for name in ModelSetup.__dataclass_fields__}
    return Setup(
        **fields,
        optimizer=optimizer,
        schedule=schedule,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
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


def fresh_state(setup: Setup, params: Any) -> dict[str, Any]:
    """A step-0 TrainState around given parameters (fine-tuning): fresh optimiser state."""

    def init(params):
        return {
            "params": params,
            "opt_state": setup.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    with setup.activate():
        return jax.jit(init, out_shardings=setup.state_shardings)(params)


# --- the loss -----------------------------------------------------------------------------------


def token_losses(graphdef, params, batch: dict, key=None, segments: bool = False) -> jax.Array:
    """Per-token cross-entropy [B, T] (nats, f32) of predicting batch["targets"].

    `segments` (data.packing=segments): attention stays inside each segment and positions
    restart; otherwise each row is one causal sequence (the fast path, cuDNN-capable)."""
    return token_losses_and_aux(graphdef, params, batch, key, segments)[0]


def token_losses_and_aux(graphdef, params, batch: dict, key=None, segments: bool = False):
    """(`token_losses`, the MoE router figures: {} for a dense model; gptjax/core/moe.py)."""
    gpt = nnx.merge(graphdef, params)
    cfg = gpt.cfg
    positions = batch["positions"] if segments else None
    segments = batch["segment_ids"] if segments else None
    h_BTD, aux = gpt.hidden_and_aux(
        batch["inputs"], key, positions_BT=positions, segment_ids_BT=segments
    )
    # model.loss_chunk > 0: never hold the full [B, T, V] f32 logits (gptjax/core/vocab_loss.py)
    losses = vocab_loss.token_losses(
        h_BTD, gpt.head(), batch["targets"], cfg.loss_chunk, cfg.vocab, cfg.logit_softcap
    )
    return losses, aux


def masked_sum(losses_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return (losses_BT * mask_BT.astype(jnp.float32)).sum()


def split_rows(batch: dict, micro_batches: int) -> dict:
    """[B, ...] arrays -> [M, B/M, ...]: row m, m+M, m+2M, ... go to micro-batch m, so every
    device holds part of each."""

    def split(a):
        B = a.shape[0]
        return a.reshape(B // micro_batches, micro_batches, *a.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def over_micro_batches(value_and_grad, params, batch: dict, micro_batches: int, key, split, stats):
    """`value_and_grad(params, micro, key) -> (loss, {stat: value}, grads)` summed over the
    micro-batches `split(batch, micro_batches)` gives, the gradients added up in one f32 buffer
    in a `lax.scan` (each micro-batch's key folded from `key`); `stats` names the stats (zeros).
    One micro-batch: one call."""
    if micro_batches == 1:
        return value_and_grad(params, batch, key)

    def accumulate(carry, xs):
        loss_sum, stats_sum, grad_sum = carry
        index, micro = xs
        micro = {k: sharding.constrain(v, ("batch", None)) for k, v in micro.items()}
        sub_key = None if key is None else jax.random.fold_in(key, index)
        loss, values, grads = value_and_grad(params, micro, sub_key)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (loss_sum + loss, add(stats_sum, values), add(grad_sum, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, values, grads), _ = jax.lax.scan(
        accumulate,
        (jnp.zeros((), jnp.float32), stats, zeros),
        (jnp.arange(micro_batches), split(batch, micro_batches)),
    )
    return loss, values, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def loss_and_grads(
    graphdef, params, batch: dict, micro_batches: int, key=None, segments=False, teacher=None
):
    """(mean loss over scored tokens, its gradient, the number of scored tokens, the MoE router
    figures: means over the micro-batches, {} for a dense model).
    `teacher` (train.distill_from, gptjax/core/distill.py): the distillation loss instead.

    The batch splits into `micro_batches` (split_rows); each contributes its masked loss sum
    divided by the whole batch's scored-token count (over_micro_batches adds them up).
    An MoE model's gradient also carries its router losses (moe.penalty, per micro-batch / M);
    the loss returned is the language-model loss alone.
    """
    count = batch["loss_mask"].astype(jnp.float32).sum()
    denominator = jnp.maximum(count, 1.0)
    model_cfg = nnx.merge(graphdef, params).cfg

    def loss_fn(params, micro, key):
        if teacher is None:
            losses, figures = token_losses_and_aux(graphdef, params, micro, key, segments)
        else:  # train.distill_from (gptjax/core/distill.py)
            losses, figures = distill.token_losses_and_aux(
                graphdef, params, teacher, micro, key, segments
            )
        lm = masked_sum(losses, micro["loss_mask"]) / denominator
        figures = jax.tree.map(lambda v: v / micro_batches, figures)
        return lm + moe.penalty(figures, model_cfg), (lm, figures)

    def value_and_grad(params, micro, key):
        (_, (lm, figures)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro, key)
        return lm, figures, grads

    no_figures = {name: jnp.zeros((), jnp.float32) for name in moe.summarise_keys(model_cfg)}
    loss, figures, grads = over_micro_batches(
        value_and_grad, params, batch, micro_batches, key, split_rows, no_figures
    )
    return loss, grads, count, figures


# --- jitted steps -------------------------------------------------------------------------------


def make_train_step(setup: Setup, objective=None):
    """jit(state, batch dict) -> (state, metrics); the state is donated. `objective` (e.g.
    gptjax/core/preference.py's DPO) replaces the language-model loss: its
    `loss_and_grads(params, batch, micro_batches, key, inputs)` gives (loss, grads, scored
    tokens, more metrics), `inputs` (sharded by its `shardings`) are passed to every step."""
    cfg, graphdef = setup.cfg, setup.graphdef
    use_dropout = cfg.model.dropout > 0
    segments = cfg.data.packing == "segments"

    def step_fn(state, batch, inputs=None):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"]) if use_dropout else None
        M = cfg.train.micro_batches
        if objective is None:
            loss, grads, count, figures = loss_and_grads(graphdef, params, batch, M, key, segments)
            more = {f"moe/{name}": value for name, value in figures.items()}  # model.moe
        else:
            loss, grads, count, more = objective.loss_and_grads(params, batch, M, key, inputs)
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
            "scored_tokens": count,
            **more,
        }
        return new_state, stats

    extra = () if objective is None else (objective.shardings,)
    jitted = jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, setup.batch_shardings, *extra),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )
    inputs = () if objective is None else (objective.inputs,)

    def run(state, batch):
        with setup.activate():
            return jitted(state, batch, *inputs)

    run.jitted = jitted  # for ahead-of-time lowering (gptjax plan); lower under setup.activate()
    return run


def make_eval_step(setup: ModelSetup, token_bytes: np.ndarray):
    """jit(params, batch) -> (sum of scored token losses in nats, tokens scored, their UTF-8
    bytes)."""
    segments = setup.cfg.data.packing == "segments"
    table = np.zeros(setup.cfg.model.vocab_size, np.float32)
    table[: len(token_bytes)] = token_bytes

    def eval_fn(params, batch):
        losses = token_losses(setup.graphdef, params, batch, segments=segments)
        mask = batch["loss_mask"].astype(jnp.float32)
        n_bytes = (jnp.asarray(table)[batch["targets"]] * mask).sum()
        return masked_sum(losses, mask), mask.sum(), n_bytes

    jitted = jax.jit(eval_fn, in_shardings=(setup.param_shardings, setup.batch_shardings))

    def run(params, batch):
        with setup.activate():
            return jitted(params, batch)

    return run


# --- batches and evaluation ---------------------------------------------------------------------


def evaluate(
    setup: ModelSetup, eval_step, params, data, n_batches: int | None, windows: int | None = None
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over `n_batches` fixed batches; with
    `windows`, over exactly the first `windows` held-out windows (rows past them in the last
    batch are read but not scored); `n_batches=None`: every held-out window once.

    A mixture (data with `parts`) is scored on each source's held-out windows (n_batches of
    each), giving eval_loss/NAME, eval_ppl/NAME and eval_bpb/NAME, and the mixed figures weigh
    the sources by the mixture's weights (`data.weights`: the loss a token of the mixture
    gets, in expectation)."""
    parts = getattr(data, "parts", None)
    if not parts:
        return _figures(_eval_totals(setup, eval_step, params, data, n_batches, windows))
    result, mixed = {}, np.zeros(3)
    for part in parts:
        totals = _eval_totals(setup, eval_step, params, part.data, n_batches, windows)
        for key, value in _figures(totals).items():
            result[f"{key}/{part.name}"] = value
        loss_sum, tokens, n_bytes = totals
        # per scored token of this source, weighted by the share of rows it gets
        mixed += (
            data.weights.get(part.name, 0.0)
            * np.array([loss_sum, tokens, n_bytes])
            / max(tokens, 1)
        )
    return {**_figures(mixed), **result}


def _eval_totals(setup, eval_step, params, data, n_batches, windows) -> np.ndarray:
    """(sum of losses in nats, tokens scored, their bytes) over the batches of `evaluate`."""
    batch_size = setup.cfg.train.batch_size
    if n_batches is None:
        windows = len(data.val)
        n_batches = -(-windows // batch_size)

    def rows(k, start, stop):
        batch = data.val_batch(k, batch_size, start, stop)
        if windows is not None:
            past = k * batch_size + np.arange(start, stop) >= windows
            batch["loss_mask"] = batch["loss_mask"] * (~past)[:, None]
        return batch

    totals = np.zeros(3)
    shape = (batch_size, setup.cfg.model.seq_len)
    for k in range(n_batches):
        batch = data_loader.assemble(setup.batch_sharding, shape, lambda a, b, k=k: rows(k, a, b))
        totals += np.array([float(x) for x in eval_step(params, batch)])
    return totals


def _figures(totals: np.ndarray) -> dict[str, float]:
    loss_sum, tokens, n_bytes = totals
    loss = loss_sum / max(tokens, 1)
    return {
        "eval_loss": float(loss),
        "eval_ppl": float(math.exp(min(loss, 700))),
        "eval_bpb": float(loss_sum / (math.log(2) * max(n_bytes, 1))),
    }
