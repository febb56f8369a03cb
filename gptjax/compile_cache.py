"""JAX's persistent compilation cache for the commands: a program compiled once on this machine
(the train step, sample's prefill and decode, serve's) loads from disk at the next start.

The commands (`gptjax ...`, `python -m gptjax ...`) turn it on before JAX is imported, in
`$GPTJAX_CACHE/xla/MACHINE` (default `~/.cache/gptjax/xla/MACHINE`). MACHINE names the CPU
model and a digest of its instruction-set flags: XLA:CPU programs are compiled for the CPU they
were built on, so a cache directory shared by machines of different kinds (a home directory on a
cluster) keeps one folder per kind. JAX keys each entry by the program, the compile options,
the devices and the jax/jaxlib versions, and writes entries only for compilations that took at
least `jax_persistent_cache_min_compile_time_secs` (1 s by default), so small programs never
touch the disk. `GPTJAX_COMPILE_CACHE=0` turns it off; a `JAX_COMPILATION_CACHE_DIR` set by the
user wins. The Python API leaves JAX's settings alone: call `enable()` to opt in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
from pathlib import Path

OFF = {"0", "off", "false", "no"}


def machine_key() -> str:
    """The CPU model and a digest of its flags, as a folder name ('x86_64-AMD-EPYC-1a2b3c4d')."""
    model, flags = platform.processor() or "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{platform.machine()}-{model}").strip("-")
    return f"{name}-{digest}"


def directory(root: str | Path | None = None) -> Path:
    """Where this machine's compiled programs are kept under the gptjax cache root."""
    root = root or os.environ.get("GPTJAX_CACHE", "~/.cache/gptjax")
    return Path(root).expanduser() / "xla" / machine_key()


def enable(root: str | Path | None = None) -> Path | None:
    """Turn the cache on (the directory, or None when GPTJAX_COMPILE_CACHE is off). Before JAX
    is imported this sets its environment variable; after, its config."""
    if os.environ.get("GPTJAX_COMPILE_CACHE", "1").strip().lower() in OFF:
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    path = directory(root)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    import sys

    if "jax" in sys.modules:  # already imported: the environment is read; set the config
        sys.modules["jax"].config.update("jax_compilation_cache_dir", str(path))
    return path
