"""Mock NVIDIA GPUs for XLA's GPU compiler on a machine without one (`gptjax plan --target`).

JAX's CUDA plugin (`pip install 'gptjax[gpu-plan]'`: `jax[cuda12]` at this jax's version) can
describe GPUs that are not there: `jax.experimental.topologies.get_topology_desc(..., "cuda",
target_config=TEXT, topology="1xHxG")` returns H hosts x G devices to build a mesh over and to
compile for, with XLA's real GPU compiler (fusion, cuDNN custom calls, buffer assignment). TEXT is
a text-format `stream_executor.GpuTargetConfig` proto; built-in ones are below, any other GPU is a
file of that format (`--target my_gpu.txtpb:16`). Nothing runs: memory analysis works, cost
analysis does not (XLA returns None), so this tells whether a step fits, never how fast it is.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax

from gptjax.errors import UserError

GPUS_PER_HOST = 8
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
INSTALL = "pip install 'gptjax[gpu-plan]'"

# The device facts of each built-in target. Hopper (H100 and H200 share the GH100 die): 132 SMs
# of 128 FP32 units, 228 KiB shared memory per SM (227 KiB for one block), 50 MiB L2, 1.98 GHz
# boost. Memory: what CUDA reports for an H100 80GB; NVIDIA's 141 GB for an H200; the 81,221.8
# MiB CUDA reports for an A100-SXM4-80GB (108 SMs of 64 FP32 units, 164 KiB shared memory per SM,
# 40 MiB L2, 1.41 GHz).
HOPPER = dict(
    core_count=132,
    fpus_per_core=128,
    shared_memory_per_core=233472,
    shared_memory_per_block_optin=232448,
    l2_cache_size=52428800,
    clock_rate_ghz=1.98,
    compute_capability=(9, 0),
)
TARGETS = {
    "h100": dict(
        HOPPER, name="NVIDIA H100 80GB HBM3", memory=84_929_347_584, bandwidth=3_350_000_000_000
    ),
    "h200": dict(HOPPER, name="NVIDIA H200", memory=141_000_000_000, bandwidth=4_800_000_000_000),
    "a100": dict(
        name="NVIDIA A100-SXM4-80GB",
        memory=85_167_243_264,
        bandwidth=2_039_000_000_000,
        core_count=108,
        fpus_per_core=64,
        shared_memory_per_core=167936,
        shared_memory_per_block_optin=166912,
        l2_cache_size=41943040,
        clock_rate_ghz=1.41,
        compute_capability=(8, 0),
    ),
}


class TargetError(UserError):
    """A --target that cannot be compiled for: unknown name, bad file, or no CUDA plugin."""


def target_config(facts: dict) -> str:
    """The text-format GpuTargetConfig of a built-in target (CUDA 12.8, cuDNN 9.7)."""
    major, minor = facts["compute_capability"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {facts["shared_memory_per_core"]}
  threads_per_core_limit: 2048
  core_count: {facts["core_count"]}
  fpus_per_core: {facts["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {facts["bandwidth"]}
  l2_cache_size: {facts["l2_cache_size"]}
  clock_rate_ghz: {facts["clock_rate_ghz"]}
  device_memory_size: {facts["memory"]}
  shared_memory_per_block_optin: {facts["shared_memory_per_block_optin"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{facts["name"]}"
"""


@dataclass(frozen=True)
class Target:
    """N GPUs of one kind: `text` its GpuTargetConfig, `memory` bytes per device."""

    name: str  # as given: h200, or the file
    kind: str  # the device description, e.g. "NVIDIA H200"
    text: str
    memory: int
    count: int

    @property
    def topology(self) -> str:
        """ "1xHxG": H hosts of G GPUs (8 per host; fewer on a single host)."""
        if self.count <= GPUS_PER_HOST:
            return f"1x1x{self.count}"
        return f"1x{self.count // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def parse(spec: str, default_count: int = GPUS_PER_HOST) -> Target:
    """`h100`, `h200`, `a100` or a GpuTargetConfig text file, optionally `:N` GPUs."""
    name, count = spec, default_count
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        name, count = head, int(tail)
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise TargetError(
            f"--target {spec}: {count} GPUs; use up to {GPUS_PER_HOST} (one host) or a multiple "
            f"of {GPUS_PER_HOST} ({GPUS_PER_HOST} per host)"
        )
    if name.lower() in TARGETS:
        facts = TARGETS[name.lower()]
        return Target(name.lower(), facts["name"], target_config(facts), facts["memory"], count)
    path = Path(name)
    if not path.is_file():
        known = ", ".join(TARGETS)
        raise TargetError(
            f"--target {spec}: not one of {known} and no file {name} (a text GpuTargetConfig)"
        )
    text = path.read_text()
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    kind = re.search(r'device_description_str:\s*"([^"]*)"', text)
    if memory is None:
        raise TargetError(f"--target {name}: no gpu_device_info.device_memory_size in the file")
    return Target(name, kind.group(1) if kind else path.stem, text, int(memory.group(1)), count)


def require_plugin() -> str:
    """The installed CUDA plugin's version; a TargetError saying what to install when it is
    missing or does not match jax's version."""
    versions = {}
    for name in PLUGINS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if not versions:
        raise TargetError(
            f"--target compiles with JAX's CUDA plugin, which is not installed: {INSTALL} "
            f"(or pip install 'jax[cuda12]=={jax.__version__}')"
        )
    name, version = next(iter(versions.items()))
    if version != jax.__version__:
        raise TargetError(
            f"{name} {version} does not match jax {jax.__version__}: "
            f"pip install 'jax[cuda12]=={jax.__version__}'"
        )
    return version


def devices(target: Target) -> list[jax.Device]:
    """`target.count` deviceless GPU descriptions, host by host (nothing is allocated)."""
    require_plugin()
    # the plugin's start-up check needs a driver (cuInit); a description needs none
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            target.name, "cuda", target_config=target.text, topology=target.topology
        )
    except Exception as error:  # a malformed target file, or a plugin that cannot describe it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TargetError(f"--target {target.name}: the CUDA plugin refused it: {first}") from None
    found = list(topology.devices)
    assert len(found) == target.count, (len(found), target.count)
    return found


# --- what the compiled program says -------------------------------------------------------------

CUDNN_ATTENTION = re.compile(r'custom_call_target="(__cudnn\$fmha[A-Za-z]*)"')


def attention_calls(hlo_text: str) -> list[str]:
    """The cuDNN attention custom calls of a compiled program (sorted, each once), e.g.
    ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]; [] when attention is XLA's own."""
    return sorted(set(CUDNN_ATTENTION.findall(hlo_text)))


def fits(peak_bytes: int, target: Target) -> bool:
    """Whether a program's peak bytes per device fit the target's device memory."""
    return peak_bytes <= target.memory


def host_count(target: Target) -> int:
    return math.ceil(target.count / GPUS_PER_HOST)
