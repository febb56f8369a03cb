"""Shared fixtures. Every test process sees 8 fake CPU devices, so every mesh shape is testable."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gptjax import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the whole session (the stdlib corpus is tokenised once)."""
    path = os.environ.get("GPTJAX_CACHE")
    return Path(path) if path else tmp_path_factory.mktemp("gptjax-cache")


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, cache_dir):
    """A tiny run trained for one step (its tokenizer reserves the role pieces, so it renders
    chats natively): the served model of tests/test_serve*.py, trained once per session."""
    from gptjax.training import loop

    run = tmp_path_factory.mktemp("chatrun")
    loop.train(tiny_config(run, cache_dir, "train.steps=1", "train.eval_steps=1"), progress=False)
    return run


def tiny_config(run_dir, cache_dir, *overrides: str) -> config.Config:
    """configs/debug.yaml pointed at `run_dir` and the session cache, with overrides."""
    return config.load(
        ROOT / "configs" / "debug.yaml",
        [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides],
    )


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run `python -m gptjax ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptjax", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def slowed_train(owner: str, method: str) -> str:
    """A `python -c` script running `gptjax train ARGV` with `owner.method` ("module:Class")
    sleeping 0.1 s a call: at most 10 batches a second, so that a signal the test sends after
    step N lands mid-run however fast the machine is (the numbers are unchanged)."""
    module, name = owner.split(":")
    return f"""
import sys, time
from {module} import {name} as owner

real = owner.{method}

def slow(self, *args):
    time.sleep(0.1)
    return real(self, *args)

owner.{method} = slow
from gptjax.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def run_processes(args_per_rank: list[list[str]], timeout: float = 240) -> list[tuple[int, str]]:
    """`python -m gptjax ARGS` as processes 0..n-1 of one job (explicit GPTJAX_* variables, one
    CPU device each, gloo); process i gets args_per_rank[i]. Returns [(exit code, stderr)] per
    process. A hang fails the test (TimeoutExpired) and leaves no process behind."""
    from gptjax.tools.launch import free_port

    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "GPTJAX_COORDINATOR": f"127.0.0.1:{free_port()}",
        "GPTJAX_NUM_PROCESSES": str(len(args_per_rank)),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gptjax", *args],
            env={**env, "GPTJAX_PROCESS_ID": str(rank)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, args in enumerate(args_per_rank)
    ]
    try:
        errs = [process.communicate(timeout=timeout)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return [(p.returncode, err) for p, err in zip(processes, errs, strict=True)]


@contextlib.contextmanager
def served(run_dir, env: dict | None = None, args=()):
    """`gptjax serve RUN_DIR --port 0 ARGS` in a subprocess; yields its base URL once it serves."""
    with served_process(run_dir, env, args) as (url, _):
        yield url


@contextlib.contextmanager
def served_process(run_dir, env: dict | None = None, args=()):
    """As `served`, yielding (base URL, the server's Popen)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gptjax", "serve", str(run_dir), "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    try:
        line = ""
        for line in process.stderr:  # noqa: B007 - the last line read is used below
            if "serving" in line:
                break
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, f"the server did not start: {line!r}"
        yield f"http://127.0.0.1:{found.group(1)}", process
    finally:
        process.terminate()
        process.wait(timeout=60)
