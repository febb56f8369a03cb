"""The memory table of docs/performance.md: shipped configs compiled for mock H100s and H200s.

    python benchmarks/gpu_memory_table.py [--configs gpt2_small,gpt3_175b] [--gpus 8,64,512]
        [--targets h100,h200] [--set mesh.fsdp=-1 mesh.tensor=1] [--out table.jsonl]
    python benchmarks/gpu_memory_table.py --markdown table.jsonl [more.jsonl ...]

Needs the gpu-plan extra (JAX's CUDA plugin). For every config, GPU count and target it runs
what `gptjax plan configs/NAME.yaml --target T:N --json` runs, with the config's own mesh and
batch. Where the config's micro-batch does not split over the mesh's batch axes at N GPUs, it
sets train.micro_batches so that each device takes one sequence per micro-batch (the same global
batch), and says so. `--set` applies dotted overrides to every config (a row's config cell
shows them). Prints one JSON line per compile (peak bytes per device, fits, cuDNN attention calls,
compile seconds; an `error` instead where the mesh cannot be built), then a Markdown table
(micro-batches marked * where set here); `--markdown` prints the table of JSON lines written
before (`--out`), compiling nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")

from gptjax import config  # noqa: E402
from gptjax.config import ConfigError  # noqa: E402
from gptjax.core import sharding  # noqa: E402
from gptjax.tools import gpu_target, plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = "gpt2_small,gpt2_medium,gpt3_125m,gpt3_350m,gpt3_760m,gpt3_1.3b,gpt3_2.7b,gpt3_6.7b,"
CONFIGS += "gpt3_13b,gpt3_175b"
GiB = 2**30


def overrides_for(cfg: config.Config, gpus: int) -> list[str]:
    """The config as shipped, or with one sequence per device per micro-batch where its
    micro-batch does not split over the batch axes at `gpus` GPUs."""
    try:
        sizes = sharding.resolve_shape(cfg.mesh, gpus)
    except ConfigError:
        return []  # the mesh itself cannot be built: reported as the error
    shape = dict(zip(config.MESH_AXES, sizes, strict=True))
    shards = shape["data"] * shape["fsdp"]
    rows = cfg.train.batch_size // cfg.train.micro_batches
    if rows % shards == 0 or cfg.train.batch_size % shards:
        return []
    return [f"train.micro_batches={cfg.train.batch_size // shards}"]


def one(name: str, gpus: int, target_name: str, settings: list[str] = ()) -> dict:
    path = ROOT / "configs" / f"{name}.yaml"
    settings = list(settings)
    extra = overrides_for(config.load(path, settings), gpus)
    cfg = config.load(path, [*settings, *extra])
    row = {"config": name, "gpus": gpus, "target": target_name, "set": settings}
    row["overrides"] = extra
    target = gpu_target.parse(f"{target_name}:{gpus}")
    start = time.perf_counter()
    try:
        report = plan.plan(cfg, gpu_target.devices(target), target=target)
    except ConfigError as error:
        return {**row, "error": str(error)}
    train = report["target"]["train_step"]
    return {
        **row,
        "mesh": report["mesh"],
        "micro_batches": report["micro_batches"],
        "state": report["bytes_per_device"]["params"] * 2 + report["bytes_per_device"]["opt_state"],
        "peak": train["peak"],
        "device_memory": target.memory,
        "fits": train["fits"],
        "cudnn_attention": train["cudnn_attention"],
        "compile_s": train["compile_s"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def markdown(rows: list[dict]) -> str:
    targets = sorted({r["target"] for r in rows})
    head = "| config | GPUs | mesh (data, fsdp, tensor) · micro-batches | "
    head += " | ".join(f"{t.upper()} peak GiB/device" for t in targets) + " |"
    lines = [head, "|" + " --- |" * (3 + len(targets))]
    label = lambda r: " ".join([r["config"], *r.get("set", [])])  # noqa: E731
    keyed = {(label(r), r["gpus"], r["target"]): r for r in rows}
    for name, gpus in dict.fromkeys((label(r), r["gpus"]) for r in rows):
        first = next(keyed[(name, gpus, t)] for t in targets if (name, gpus, t) in keyed)
        if "error" in first:
            lines.append(f"| {name} | {gpus} | {first['error']} |" + " — |" * len(targets))
            continue
        mesh = ", ".join(str(v) for v in first["mesh"].values())
        cells = []
        for t in targets:
            r = keyed.get((name, gpus, t))
            if r is None or "error" in r:
                cells.append("—")
                continue
            verdict = "fits" if r["fits"] else "**does not fit**"
            cells.append(f"{r['peak'] / GiB:,.1f} {verdict}")
        micro = f"{first['micro_batches']}{'*' if first['overrides'] else ''}"  # * set here
        lines.append(f"| {name} | {gpus} | ({mesh}) · {micro} | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_memory_table.py")
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--gpus", default="8,64,512")
    parser.add_argument("--targets", default="h100,h200")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides for every config")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--markdown", nargs="+", default=None, help="JSON-line files: the table")
    args = parser.parse_args()
    if args.markdown:
        lines = [line for f in args.markdown for line in Path(f).read_text().splitlines()]
        print(markdown([json.loads(line) for line in lines if line.strip()]))
        return
    rows = []
    for name in args.configs.split(","):
        for gpus in map(int, args.gpus.split(",")):
            for target in args.targets.split(","):
                row = one(name, gpus, target, args.set)
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(line + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
