"""`gptjax plan`: what a config costs on a mesh, worked out ahead of time without allocating.

Reports parameter counts, training FLOPs per token (PaLM appendix B: 6·N + 12·L·H·Q·T, with N
all parameters except position embeddings, L layers, H heads, Q head size, T context), and per
device the bytes of parameters, gradients and optimiser state, computed from their shapes and
shardings. It then lowers the real train step on abstract inputs (`jax.ShapeDtypeStruct`, nothing
is allocated), compiles it and reads XLA's memory analysis.

Meshes larger than the machine use fake CPU devices (`jax_num_cpu_devices`, which must be set
before JAX starts its backends; when they have already started with too few devices, the command
runs itself again in a fresh process). The compiled numbers are therefore XLA:CPU's: a GPU or TPU
compiler fuses differently and may keep fewer f32 temporaries, so treat `xla_total` as an
estimate; the analytic parameter/gradient/optimiser bytes are exact on any platform.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.config import Config, ConfigError
from gptjax.core import flops, steps

GiB = 2**30
FLOPS_FORMULA = flops.FLOPS_FORMULA


# --- devices ----------------------------------------------------------------------------------


def devices_needed(cfg: Config, requested: int | None) -> int:
    """`--devices N`, else the mesh's fixed sizes multiplied (a -1 axis then counts as 1)."""
    if requested is not None:
        return requested
    sizes = [*cfg.mesh.sizes().values(), *cfg.mesh.dcn().values()]
    return math.prod(size for size in sizes if size != -1)


def cpu_devices(n: int) -> list[jax.Device] | None:
    """`n` CPU devices, fake ones if needed; None when JAX already started with fewer.

    Never shrinks the device count of a process that asked for more (e.g. a test session).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    want = max(n, int(forced.group(1)) if forced else 1, jax.config.jax_num_cpu_devices)
    try:
        jax.config.update("jax_num_cpu_devices", want)
        jax.config.update("jax_platforms", "cpu")  # plan never needs an accelerator
    except RuntimeError:  # backends already started: use what exists
        pass
    devices = jax.devices("cpu")
    return devices[:n] if len(devices) >= n else None


# --- analytic bytes ---------------------------------------------------------------------------


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    """Bytes one device holds of `leaf` (shards divide evenly: build() checked)."""
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def _path_name(path) -> str:
    return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def param_rows(setup: steps.Setup) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, partition spec, dtype, bytes per device."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(setup.abstract_state["params"]):
        rows.append(
            {
                "name": _path_name(path),
                "shape": list(leaf.shape),
                "spec": str(tuple(leaf.sharding.spec)),
                "dtype": str(jnp.dtype(leaf.dtype)),
                "bytes_per_device": _shard_bytes(leaf),
            }
        )
    return rows


def state_bytes(setup: steps.Setup) -> dict[str, int]:
    """Bytes per device of params, gradients (same shapes, dtype and shardings as the params;
    one copy, as when micro_batches=1) and optimiser state (Adam's two moments and counters)."""
    params = sum(_shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state["params"]))
    opt = sum(_shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state["opt_state"]))
    return {"params": params, "grads": params, "opt_state": opt}


def batch_spec(setup: steps.Setup) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's input: the batch dict, [batch_size, seq_len] int32 per key, sharded."""
    return setup.abstract_batch()


# --- XLA --------------------------------------------------------------------------------------


def compile_step(setup: steps.Setup) -> jax.stages.Compiled:
    """The train step compiled ahead of time for abstract inputs; callable as (state, batch)."""
    step = steps.make_train_step(setup)
    with setup.activate():
        return step.jitted.lower(setup.abstract_state, batch_spec(setup)).compile()


def xla_memory(setup: steps.Setup, compiled: jax.stages.Compiled | None = None):
    """XLA's per-device memory analysis of the compiled train step (bytes), or None.

    `total` = arguments + outputs - aliased (donated state reused for the new state) + temporaries:
    the peak the compiled step needs on one device. `state` = arguments - the batch shard, i.e.
    params + optimiser state + step as XLA lays them out.
    """
    compiled = compiled or compile_step(setup)
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    out = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["state"] = out["argument"] - sum(_shard_bytes(x) for x in batch_spec(setup).values())
    return out


# --- the report -------------------------------------------------------------------------------


def plan(cfg: Config, devices: list[jax.Device], xla: bool = True) -> dict[str, Any]:
    """The plan of `cfg` on `devices` as one JSON-ready dict (bytes are per device)."""
    setup = steps.build(cfg, devices)  # every config/mesh check, before compiling
    counts = flops.param_counts(cfg.model)
    per_token = flops.flops_per_token(cfg.model)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    state = state_bytes(setup)
    memory = xla_memory(setup) if xla else None
    return {
        "devices": len(devices),
        "mesh": dict(setup.mesh.shape),
        "params": counts["params"],
        "non_embedding_params": counts["non_embedding_params"],
        "flops_per_token": per_token,
        "flops_formula": FLOPS_FORMULA,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.model.seq_len,
        "tokens_per_step": tokens,
        "flops_per_step": per_token * tokens,
        "micro_batches": cfg.train.micro_batches,
        "bytes_per_device": {**state, "xla_total": memory["total"] if memory else None},
        "xla": memory,
        "param_table": param_rows(setup),
    }


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:,.2f} GiB"


def format_text(report: dict[str, Any], show_params: bool = False) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    size = report["bytes_per_device"]
    lines = [
        f"devices              {report['devices']} (mesh {mesh})",
        f"parameters           {report['params']:,} "
        f"(non-embedding {report['non_embedding_params']:,})",
        f"training FLOPs/token {report['flops_per_token']:.4g}   {report['flops_formula']}",
        f"tokens/step          {report['tokens_per_step']:,} = {report['batch_size']} × "
        f"{report['seq_len']} in {report['micro_batches']} micro-batch(es); "
        f"FLOPs/step {report['flops_per_step']:.4g}",
        "bytes per device",
        f"  params             {_gib(size['params'])}",
        f"  grads              {_gib(size['grads'])}",
        f"  optimizer state    {_gib(size['opt_state'])}",
    ]
    memory = report["xla"]
    if memory is None:
        lines.append("  XLA analysis       skipped (--no-xla)")
    else:
        lines += [
            f"  XLA:CPU compiled   total {_gib(memory['total'])} = arguments "
            f"{_gib(memory['argument'])} + temporaries {_gib(memory['temp'])} + outputs "
            f"{_gib(memory['output'])} - donated {_gib(memory['alias'])}",
        ]
    if show_params:
        rows = report["param_table"]
        width = max(len(row["name"]) for row in rows)
        lines += ["", f"{'name':<{width}}  {'shape':<24} {'spec':<44} {'bytes/device':>14}"]
        for row in rows:
            shape = "×".join(map(str, row["shape"]))
            lines.append(
                f"{row['name']:<{width}}  {shape:<24} {row['spec']:<44} "
                f"{row['bytes_per_device']:>14,}"
            )
    return "\n".join(lines)


def _argv(args) -> list[str]:
    argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices)]
    argv += [flag for flag, on in (("--json", args.json), ("--params", args.params)) if on]
    return argv + (["--no-xla"] if args.no_xla else [])


def run(args) -> int:
    """The `plan` subcommand (args from gptjax.cli)."""
    from gptjax import config

    cfg = config.load(args.config, args.overrides)
    args.devices = devices_needed(cfg, args.devices)
    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: plan needs at least one device")
    devices = cpu_devices(args.devices)
    if devices is None:  # JAX started with fewer devices in this process: plan in a fresh one
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(args.devices), "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-m", "gptjax", *_argv(args)], env=env).returncode
    report = plan(cfg, devices, xla=not args.no_xla)
    if args.json:
        if not args.params:
            report.pop("param_table")
        print(json.dumps(report))
    else:
        print(format_text(report, show_params=args.params))
    return 0
