"""Device mesh and logical-axis sharding.

The model names its axes (`embed`, `heads`, ...); one rules table maps each logical name to a
mesh axis (`data`, `fsdp`, `expert`, `tensor`), several, or none. Data parallel, FSDP, expert
parallel and tensor parallel are then only choices of mesh shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax.config import DCN_AXES, MESH_AXES, ConfigError, MeshConfig

# logical axis -> mesh axes. A mesh axis already used by an earlier dimension of the same array
# is skipped, so activations [batch, seq, embed] shard batch over (data, fsdp) and leave embed
# whole, while weights [embed, mlp] shard embed over fsdp (ZeRO-3) and mlp over tensor.
# `expert` (MoE): an expert weight [expert, embed, mlp] puts its experts on mesh.expert (so embed
# keeps only fsdp); everywhere else mesh.expert acts as one more fsdp axis: it splits the batch
# and shards the dense weights' embed (as GShard and MaxText do), so no device idles outside the
# MoE layers and tokens meet their experts by one all-to-all within each expert group.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp", "expert"),
    "expert": ("expert",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "qkv": (),
    "mlp": ("tensor",),
    "layers": (),
    "positions": (),
    "router": (),  # the router's logits over the experts (replicated: it is small)
}

Rules = Mapping[str, tuple[str, ...]]

# The config key that sets the size of each logical axis (named in divisibility errors).
SIZE_KEYS = {
    "vocab": "model.vocab_size",
    "heads": "model.n_head",
    "mlp": "model.d_ff",
    "embed": "model.d_model",
    "head_dim": "model.head_dim",
    "kv_heads": "model.n_kv_head",
    "positions": "model.max_positions",
    "layers": "model.n_layer",
    "qkv": "the q/k/v axis",
    "batch": "the batch",
    "seq": "model.seq_len",
    "expert": "model.moe.experts",
    "router": "model.moe.experts",
}

# What to do when an axis does not divide (default: change the model size, the mesh or rules).
# Grouped-query attention whose tensor size does not divide the key/value heads is refused
# before compiling; mapping kv_heads to no mesh axis replicates them on every tensor shard.
FIXES = {
    "kv_heads": "set mesh.rules.kv_heads=null to replicate the key/value heads on every tensor "
    "shard, or change model.n_kv_head or mesh.tensor",
}

log = logging.getLogger("gptjax")


def make_rules(
    overrides: Mapping[str, str | list[str] | None] | None = None, expert: bool = False
) -> dict:
    """The default table updated with the config's `mesh.rules`.

    `expert`: the mesh's expert axis is larger than 1. When it is not, the defaults leave the
    axis out (so a dense model's partition specs read as they always did)."""
    rules = dict(DEFAULT_RULES)
    if not expert:
        rules = {name: tuple(a for a in axes if a != "expert") for name, axes in rules.items()}
    for name, axes in (overrides or {}).items():
        if name not in DEFAULT_RULES:
            raise ConfigError(
                f"mesh.rules.{name}: unknown logical axis; use one of {', '.join(DEFAULT_RULES)}"
            )
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        bad = [axis for axis in axes if axis not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; use {MESH_AXES}")
        rules[name] = tuple(axes)
    return rules


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, never using one mesh axis twice."""
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = tuple(axis for axis in rules[name] if axis not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def resolve_shape(config: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Mesh sizes (one per MESH_AXES) over all devices, with -1 filled in; dcn sizes included."""
    dcn = config.dcn()
    sizes = config.sizes()
    fill = [axis for axis, size in sizes.items() if size == -1]
    known = math.prod(s for s in sizes.values() if s != -1) * math.prod(dcn.values())
    if fill:
        if n_devices % known:
            raise ConfigError(
                f"mesh {_show(config)} does not divide the {n_devices} devices "
                f"(the fixed axes already need {known})"
            )
        sizes[fill[0]] = n_devices // known
    needed = math.prod(sizes.values()) * math.prod(dcn.values())
    if needed != n_devices:
        raise ConfigError(
            f"mesh {_show(config)} needs {needed} devices but {n_devices} are available"
        )
    return tuple(sizes[axis] * dcn[axis] for axis in MESH_AXES)


def _show(config: MeshConfig) -> str:
    sizes = config.sizes()
    text = " ".join(
        f"{axis}={size}"
        for axis, size in sizes.items()
        if axis != "expert" or size != 1  # a dense model's mesh reads as before
    )
    if math.prod(config.dcn().values()) > 1:
        text += " " + " ".join(f"{key}={getattr(config, key)}" for key in DCN_AXES.values())
    return text


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES with neighbouring devices next to each other; with `dcn_*` sizes a
    hybrid mesh whose slow (between-host) factor spans processes."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_shape(config, len(devices))
    dcn = tuple(config.dcn().values())
    if math.prod(dcn) > 1:
        processes = len({d.process_index for d in devices})
        if devices[0].platform != "tpu" and processes != math.prod(dcn):
            keys = " ".join(
                f"{k}={getattr(config, k)}"
                for axis, k in DCN_AXES.items()
                if axis != "expert" or getattr(config, k) != 1  # a dense mesh reads as before
            )
            raise ConfigError(
                f"mesh {keys} spans {math.prod(dcn)} hosts but these devices belong to "
                f"{processes} process(es); set the dcn_* sizes to 1 on one host"
            )
        ici = tuple(size // d for size, d in zip(shape, dcn, strict=True))
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=devices[0].platform != "tpu"
            )
        except (ValueError, AssertionError) as error:
            raise ConfigError(f"mesh {_show(config)}: {str(error).splitlines()[0]}") from None
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --- activation constraints -------------------------------------------------------------------
# The model calls `constrain(x, names)`; it is a no-op until a training or eval step activates a
# mesh and rules with `activate`. Inside `activate` a constraint is always applied.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "gptjax_sharding", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Trace under `mesh` and `rules`: `constrain` applies, and jit sees the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) a step activated, or None outside `activate`."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def _label(axes: Sequence[str], mesh: Mesh) -> str:
    """`mesh.tensor=4` or `mesh.data×mesh.fsdp=8` (sizes include dcn_* factors)."""
    size = math.prod(mesh.shape[axis] for axis in axes)
    return "×".join(f"mesh.{axis}" for axis in axes) + f"={size}"


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_parameters(shapes, logical, rules: Rules, mesh: Mesh) -> set[str]:
    """Check every parameter dimension against the mesh axes that shard it, before compiling.

    `shapes` is a pytree of arrays or ShapeDtypeStructs, `logical` the matching pytree of
    PartitionSpecs of logical names. Raises ConfigError naming the config key, e.g.
    "model.n_head=6 is not divisible by mesh.tensor=4". Returns the mesh axes of size > 1 that
    shard at least one parameter.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)
    used: set[str] = set()
    flat_names = jax.tree.leaves(logical, is_leaf=is_spec)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    for (path, leaf), names in zip(flat_shapes, flat_names, strict=True):
        spec = logical_to_spec(tuple(names), rules)
        for dim, name, entry in zip(leaf.shape, names, spec, strict=False):
            axes = _spec_axes(entry)
            size = math.prod(mesh.shape[axis] for axis in axes)
            if dim % size:
                key = SIZE_KEYS.get(name, f"parameter {jax.tree_util.keystr(path)} axis {name}")
                fix = FIXES.get(name, "change the model size, the mesh or mesh.rules")
                raise ConfigError(f"{key}={dim} is not divisible by {_label(axes, mesh)}; {fix}")
            used.update(axis for axis in axes if mesh.shape[axis] > 1)
    return used


def batch_axes(rules: Rules, mesh: Mesh) -> set[str]:
    """The mesh axes of size > 1 that shard the batch."""
    return {a for a in _spec_axes(logical_to_spec(("batch",), rules)[0]) if mesh.shape[a] > 1}


def check_batch(batch_size: int, micro_batches: int, rules: Rules, mesh: Mesh) -> set[str]:
    """The per-micro-batch row count must divide over the mesh axes that shard `batch`.

    Returns the mesh axes of size > 1 that shard the batch.
    """
    axes = _spec_axes(logical_to_spec(("batch",), rules)[0])
    size = math.prod(mesh.shape[axis] for axis in axes)
    rows = batch_size // micro_batches
    if rows % size:
        what = f"train.batch_size={batch_size}"
        if micro_batches > 1:
            what += f" / train.micro_batches={micro_batches} = {rows} rows per micro-batch"
        raise ConfigError(f"{what} is not divisible by {_label(axes, mesh)}")
    return batch_axes(rules, mesh)


def warn_idle_axes(mesh: Mesh, param_axes: set[str], batch_axes: set[str]) -> list[str]:
    """Log one warning line per mesh axis of size > 1 that shards no parameter.

    `data` is exempt while it shards the batch (that is data parallelism). Returns the lines.
    """
    lines = []
    for axis in MESH_AXES:
        size = mesh.shape[axis]
        if size == 1 or axis in param_axes or (axis == "data" and axis in batch_axes):
            continue
        if axis in batch_axes:
            effect = "it only splits the batch, like mesh.data"
        else:
            effect = f"its {size} device groups repeat the same work"
        lines.append(
            f"mesh.{axis}={size} shards no parameter ({effect}); check mesh.rules or the mesh shape"
        )
        log.warning(lines[-1])
    return lines
