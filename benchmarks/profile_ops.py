"""Top XLA operations of a gptjax training step on CPU, from a jax.profiler trace.

Traces a few compiled steps (XLA:CPU emits one trace event per thunk with
--xla_cpu_enable_xprof_traceme), reads the trace back with jax.profiler.ProfileData and sums the
event durations by name: fusions, dots (matmuls) and copies, in ms per step and % of the step.

    python benchmarks/profile_ops.py configs/cpu_small.yaml [key=value ...] [--steps 3 --top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import jax  # noqa: E402

from gptjax import config  # noqa: E402
from gptjax.core import steps
from gptjax.tools import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--width", type=int, default=160, help="characters of HLO per line")
    args = parser.parse_args()
    cfg = config.load(args.config, args.overrides)
    setup = steps.build(cfg, jax.devices()[:1])
    state = steps.init_state(setup)
    batch = bench.make_batches(setup, 1, "synthetic")[0]
    step = steps.make_train_step(setup)
    with setup.activate():
        compiled = step.jitted.lower(state, batch).compile()
    for _ in range(2):
        state, stats = compiled(state, batch)
    jax.block_until_ready(state)
    log_dir = Path(tempfile.mkdtemp(prefix="gptjax-profile-"))
    begin = time.perf_counter()
    with jax.profiler.trace(str(log_dir)):
        for _ in range(args.steps):
            state, stats = compiled(state, batch)
            jax.block_until_ready(state)
    step_ms = 1e3 * (time.perf_counter() - begin) / args.steps
    trace = next(log_dir.rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
    totals: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
    print(f"step {step_ms:.0f} ms (traced, {args.steps} steps); trace {trace}", file=sys.stderr)
    # The optimised HLO says what each named instruction is: its shape and operands.
    hlo = {}
    for line in compiled.as_text().splitlines():
        line = line.strip().removeprefix("ROOT ")
        if line.startswith("%") and " = " in line:
            name, rest = line[1:].split(" = ", 1)
            hlo.setdefault(name, rest)
    print(f"{'ms/step':>9} {'%step':>6} {'calls':>6}  name: HLO")
    for name, ns in totals.most_common(args.top):
        ms = ns / 1e6 / args.steps
        what = hlo.get(name, "")[: args.width]
        print(
            f"{ms:9.1f} {100 * ms / step_ms:6.1f} {counts[name] // args.steps:6d}  {name}: {what}"
        )


if __name__ == "__main__":
    main()
