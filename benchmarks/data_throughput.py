"""Measure the data pipeline: prepare throughput and loader throughput (report, not a test).

    python benchmarks/data_throughput.py configs/cpu_small.yaml [key=value ...] [--fresh]
        [--steps 50] [--batch-size B --seq-len T]

Prints one JSON object: the prepare stages (documents written, tokenizer trained, tokens packed)
in seconds, MB/s of UTF-8 text and tokens/s, then the loader: rows read per second by
`Dataset.train_rows` and global batches per second built by `loader.assemble` on this process's
devices (the same calls the train loop makes in its prefetch thread), in tokens/s.
`--fresh` prepares into an empty temporary cache, so every stage is timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def measure_prepare(cfg, seq_len: int, max_vocab: int) -> dict:
    """Each stage timed separately into `cfg.cache_dir` (which should be empty)."""
    from gptjax.data import array_records, pipeline

    root = pipeline.cache_root(cfg)
    docs = array_records.open_documents(cfg, root)
    _, t_docs = _timed(lambda: docs.train)
    tokenizer_bytes, t_tok = _timed(pipeline._trained_tokenizer, cfg, docs, root)
    directory, t_pack = _timed(pipeline.prepare, cfg, seq_len, max_vocab=max_vocab)
    meta = json.loads((directory / "meta.json").read_text())
    text = meta["train"]["bytes"] + meta["validation"]["bytes"]
    tokens = meta["train"]["tokens"] + meta["validation"]["tokens"]
    return {
        "text_MB": round(text / 1e6, 2),
        "tokens": tokens,
        "documents_s": round(t_docs, 2),
        "tokenizer_train_s": round(t_tok, 2),
        "tokenize_pack_s": round(t_pack, 2),
        "tokenize_MB_per_s": round(text / 1e6 / t_pack, 2),
        "tokenize_tokens_per_s": round(tokens / t_pack),
        "total_MB_per_s": round(text / 1e6 / (t_docs + t_tok + t_pack), 2),
        "tokenizer_bytes": len(tokenizer_bytes),
    }


def measure_loader(data, batch_size: int, steps: int, seed: int = 0) -> dict:
    import jax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    from gptjax.data import loader

    window = data.train.window
    data.train_rows(seed, 0, batch_size, 0, batch_size)  # warm up (grain import, reader)
    _, t_rows = _timed(
        lambda: [data.train_rows(seed, s, batch_size, 0, batch_size) for s in range(steps)]
    )
    devices = np.array(jax.local_devices())
    mesh = Mesh(devices, ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    shape = (batch_size, window)

    def build(step):
        batch = loader.assemble(
            sharding, shape, lambda a, b: data.train_batch(seed, step, batch_size, a, b)
        )
        return jax.block_until_ready(batch)

    _, t_arrays = _timed(lambda: [build(s) for s in range(steps)])
    tokens = batch_size * (window - 1)
    return {
        "batch_size": batch_size,
        "seq_len": window - 1,
        "windows": len(data.train),
        "devices": len(devices),
        "rows_ms_per_batch": round(1e3 * t_rows / steps, 2),
        "rows_tokens_per_s": round(tokens * steps / t_rows),
        "global_array_ms_per_batch": round(1e3 * t_arrays / steps, 2),
        "global_array_tokens_per_s": round(tokens * steps / t_arrays),
    }


def main(argv: list[str] | None = None) -> int:
    from gptjax import config
    from gptjax.data import pipeline

    prog = "python benchmarks/data_throughput.py"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--fresh", action="store_true", help="prepare into an empty cache")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=None, help="default train.batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="default model.seq_len")
    args = parser.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    seq_len = args.seq_len or cfg.model.seq_len
    batch_size = args.batch_size or cfg.train.batch_size
    data_cfg = cfg.data
    result: dict = {"source": data_cfg.source}
    with tempfile.TemporaryDirectory() as scratch:
        if args.fresh:
            data_cfg = data_cfg.model_copy(update={"cache_dir": str(Path(scratch) / "cache")})
            result["prepare"] = measure_prepare(data_cfg, seq_len, cfg.model.vocab_size)
        data = pipeline.load_dataset(data_cfg, seq_len, max_vocab=cfg.model.vocab_size)
        result["loader"] = measure_loader(data, batch_size, args.steps, cfg.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
