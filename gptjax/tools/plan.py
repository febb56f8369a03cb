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

`--target h200:64` (h100, a100, or a GpuTargetConfig file; N GPUs, 8 per host) compiles the same
step with XLA's GPU compiler for N mock GPUs instead (gptjax/tools/gpu_target.py; needs the
`gpu-plan` extra): the step takes the GPU's choices (cuDNN flash attention in bf16), and the
report adds whether it fits the device memory, the cuDNN attention calls in the program and the
compile time; `--generate` also compiles the prefill and decode programs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.config import Config, ConfigError
from gptjax.core import flops, model, steps
from gptjax.tools import gpu_target

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


def param_rows(setup: steps.Setup) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, partition spec, dtype, bytes per device."""
    rows = []
    for name, leaf in model.by_name(setup.abstract_params).items():
        rows.append(
            {
                "name": name,
                "shape": list(leaf.shape),
                "spec": str(tuple(leaf.sharding.spec)),
                "dtype": str(jnp.dtype(leaf.dtype)),
                "bytes_per_device": _shard_bytes(leaf),
            }
        )
    return rows


def expert_bytes(setup: steps.ModelSetup) -> int:
    """Bytes per device of the experts' weights (the parameters with an `expert` axis)."""
    _, state = model.abstract(setup.model_cfg)
    declared = model.declared(state, "out_sharding")
    is_axes = lambda x: isinstance(x, tuple)
    axes = {
        model.param_name(path): names
        for path, names in jax.tree_util.tree_leaves_with_path(declared, is_leaf=is_axes)
    }
    leaves = model.by_name(setup.abstract_params)
    return sum(_shard_bytes(leaves[name]) for name, names in axes.items() if "expert" in names)


def state_bytes(setup: steps.Setup) -> dict[str, int]:
    """Bytes per device of params, gradients (same shapes, dtype and shardings as the params;
    one copy, as when micro_batches=1) and optimiser state (Adam's two moments and counters)."""
    params = sum(_shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state["params"]))
    opt = sum(_shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state["opt_state"]))
    return {"params": params, "grads": params, "opt_state": opt}


# --- XLA --------------------------------------------------------------------------------------


def compile_step(setup: steps.Setup) -> jax.stages.Compiled:
    """The train step compiled ahead of time for abstract inputs; callable as (state, batch)."""
    step = steps.make_train_step(setup)
    with setup.activate():
        return step.jitted.lower(setup.abstract_state, setup.abstract_batch()).compile()


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
    out["state"] = out["argument"] - sum(_shard_bytes(x) for x in setup.abstract_batch().values())
    return out


# --- the report -------------------------------------------------------------------------------


def plan(
    cfg: Config,
    devices: list[jax.Device],
    xla: bool = True,
    target: gpu_target.Target | None = None,
    generate: bool = False,
    rows: int | None = None,
) -> dict[str, Any]:
    """The plan of `cfg` on `devices` as one JSON-ready dict (bytes are per device). With a
    `target` (the devices are its mock GPUs) the report's "target" section says whether the
    step fits and which attention it uses; `generate` adds the prefill and decode programs
    for `rows` rows (default: the fewest the mesh's batch axes take)."""
    setup = steps.build(cfg, devices)  # every config/mesh check, before compiling
    counts = flops.param_counts(cfg.model)
    per_token = flops.flops_per_token(cfg.model)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    state = state_bytes(setup)
    memory = compiled = None
    if xla or target is not None:
        start = time.perf_counter()
        compiled = compile_step(setup)
        seconds = time.perf_counter() - start
        memory = xla_memory(setup, compiled)
    report = {
        "devices": len(devices),
        "mesh": dict(setup.mesh.shape),
        "params": counts["params"],
        "non_embedding_params": counts["non_embedding_params"],
        "embedding_params": counts["embedding_params"],
        "active_params": counts["active_params"],
        "active_non_embedding_params": counts["active_non_embedding_params"],
        "expert_params": counts["expert_params"],
        "flops_per_token": per_token,
        "flops_formula": FLOPS_FORMULA,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.model.seq_len,
        "tokens_per_step": tokens,
        "flops_per_step": per_token * tokens,
        "micro_batches": cfg.train.micro_batches,
        "bytes_per_device": {
            **state,
            **({"experts": expert_bytes(setup)} if counts["expert_params"] else {}),
            "xla_total": memory["total"] if memory else None,
        },
        "xla": memory,
        "compiler": "XLA:GPU" if target is not None else f"XLA:{devices[0].platform.upper()}",
        "param_table": param_rows(setup),
    }
    if target is not None:
        train = program_report(compiled, seconds, target)
        report["target"] = {
            "gpu": target.kind,
            "name": target.name,
            "gpus": target.count,
            "topology": target.topology,
            "device_memory": target.memory,
            "attention": setup.model_cfg.attention,
            "train_step": train,
            "fits": train["fits"],
        }
        if generate:
            report["target"]["generate"] = generate_report(setup, target, rows)
            report["target"]["fits"] = all(
                program["fits"]
                for program in (train, *report["target"]["generate"]["programs"].values())
            )
    return report


def program_report(compiled: jax.stages.Compiled, seconds: float, target) -> dict[str, Any]:
    """What XLA's GPU compiler says of one program: peak bytes per device (arguments +
    outputs - donated + temporaries), whether that fits, its cuDNN attention calls, the
    compile time in seconds."""
    stats = compiled.memory_analysis()
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return {
        "peak": peak,
        "argument": stats.argument_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "fits": gpu_target.fits(peak, target),
        "cudnn_attention": gpu_target.attention_calls(compiled.as_text()),
        "compile_s": round(seconds, 2),
    }


def generate_report(setup: steps.Setup, target, rows: int | None) -> dict[str, Any]:
    """The prefill (the longest prompt) and decode programs of `gptjax sample`/`serve`,
    compiled for the target: parameters as stored (param_dtype), a seq_len-slot KV cache."""
    from gptjax.inference import generate

    generator = generate.Generator(setup, setup.abstract_state["params"])
    programs = {}
    for name, lowered_fn in generator.lowered(rows).items():
        start = time.perf_counter()
        compiled = lowered_fn().compile()
        programs[name] = program_report(compiled, time.perf_counter() - start, target)
    return {"rows": generator.plan_rows(rows), "programs": programs}


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:,.2f} GiB"


def format_text(report: dict[str, Any], show_params: bool = False) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    size = report["bytes_per_device"]
    lines = [
        f"devices              {report['devices']} (mesh {mesh})",
        f"parameters           {report['params']:,} "
        f"(non-embedding {report['non_embedding_params']:,}, "
        f"embedding {report['embedding_params']:,})",
        f"training FLOPs/token {report['flops_per_token']:.4g}   {report['flops_formula']}",
        f"tokens/step          {report['tokens_per_step']:,} = {report['batch_size']} × "
        f"{report['seq_len']} in {report['micro_batches']} micro-batch(es); "
        f"FLOPs/step {report['flops_per_step']:.4g}",
        "bytes per device",
        f"  params             {_gib(size['params'])}",
        f"  grads              {_gib(size['grads'])}",
        f"  optimizer state    {_gib(size['opt_state'])}",
    ]
    if report["expert_params"]:
        lines[2:2] = [
            f"active parameters    {report['active_params']:,} per token (non-embedding "
            f"{report['active_non_embedding_params']:,}; experts' weights "
            f"{report['expert_params']:,} in all, {_gib(size['experts'])} per device)"
        ]
    memory = report["xla"]
    if memory is None:
        lines.append("  XLA analysis       skipped (--no-xla)")
    else:
        lines += [
            f"  {report['compiler']} compiled   total {_gib(memory['total'])} = arguments "
            f"{_gib(memory['argument'])} + temporaries {_gib(memory['temp'])} + outputs "
            f"{_gib(memory['output'])} - donated {_gib(memory['alias'])}",
        ]
    if "target" in report:
        lines += format_target(report["target"])
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


def format_target(target: dict[str, Any]) -> list[str]:
    memory = target["device_memory"]
    attention = target["attention"]
    lines = [
        f"target               {target['gpus']} x {target['gpu']} (mock, {target['topology']}), "
        f"{_gib(memory)} each",
        f"attention            {attention}",
    ]
    programs = {"train step": target["train_step"]}
    programs.update(target.get("generate", {}).get("programs", {}))
    for name, program in programs.items():
        verdict = "fits" if program["fits"] else "DOES NOT FIT"
        calls = ", ".join(program["cudnn_attention"]) or "none"
        lines.append(
            f"  {name:<18} {verdict}: {_gib(program['peak'])} of {_gib(memory)} "
            f"({program['peak'] / memory:.0%}); cuDNN attention calls: {calls}; "
            f"compiled in {program['compile_s']:.1f} s"
        )
    if "generate" in target:
        lines.append(f"  (generation: {target['generate']['rows']} rows, a seq_len-slot cache)")
    lines.append("  speed: not known (XLA gives no cost analysis for a mock GPU)")
    return lines


def _argv(args) -> list[str]:
    argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices)]
    argv += [flag for flag, on in (("--json", args.json), ("--params", args.params)) if on]
    return argv + (["--no-xla"] if args.no_xla else [])


def run(args) -> int:
    """The `plan` subcommand (args from gptjax.cli)."""
    from gptjax import config

    cfg = config.load(args.config, args.overrides)
    if getattr(args, "target", None):
        return _run_target(cfg, args)
    if getattr(args, "generate", False) or getattr(args, "rows", None) is not None:
        raise ConfigError("--generate and --rows go with --target (e.g. --target h200:8)")
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


def _run_target(cfg: Config, args) -> int:
    """`plan --target`: the step compiled by XLA's GPU compiler for mock GPUs."""
    target = gpu_target.parse(args.target, args.devices or gpu_target.GPUS_PER_HOST)
    try:
        jax.config.update("jax_platforms", "cpu")  # the process itself never needs a GPU
    except RuntimeError:  # backends already started
        pass
    devices = gpu_target.devices(target)
    report = plan(cfg, devices, target=target, generate=args.generate, rows=args.rows)
    if args.json:
        if not args.params:
            report.pop("param_table")
        print(json.dumps(report))
    else:
        print(format_text(report, show_params=args.params))
    return 0
