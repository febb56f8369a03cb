"""int8 weights (--quantize int8) against f32 on a trained run: quality, memory, speed.

    python benchmarks/quantize.py RUN_DIR [--step N] [--prompts 16] [--new 64] [--rounds 3]
                                  [--memory-config configs/gpt2_small.yaml]

Quality: held-out bits per byte of both (every held-out window once, as `gptjax eval`); the
logits of the first held-out batch (largest and RMS difference, next-token argmax agreement);
greedy continuations of `--prompts` held-out prompts (32 tokens each): the share of generated
tokens equal to f32's and of continuations identical throughout. Memory: the parameters' bytes
and XLA's memory analysis of the compiled decode program (its arguments: parameters and cache;
its temporaries: what the dequantisation adds). Speed: greedy decoding of `--new` tokens at 1
and 8 rows, f32 and int8 interleaved for `--rounds` rounds (medians; the machine may be
shared). `--memory-config`: the same memory figures for a bigger config on random weights
(compiled only, never run). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import config
from gptjax.core import quantize, steps
from gptjax.data import loader as data_loader
from gptjax.inference import generate
from gptjax.inference.settings import Sampling
from gptjax.training import runs


def decode_memory(setup, params, rows: int) -> dict:
    lowered = generate.Generator(setup, params, 16).lowered(rows)["decode"]()
    m = lowered.compile().memory_analysis()
    return {
        "argument_mb": round(m.argument_size_in_bytes / 2**20, 3),
        "temp_mb": round(m.temp_size_in_bytes / 2**20, 3),
        "params_mb": round(quantize.nbytes(params) / 2**20, 3),
    }


def greedy(setup, params, prompts, new: int) -> tuple[list[list[int]], float]:
    gen = generate.Generator(setup, params, 16)
    out = [[] for _ in prompts]
    start = time.perf_counter()
    for tokens, emitted, _ in gen.stream(prompts, new, Sampling(0.0)):
        for r in range(len(prompts)):
            out[r] += tokens[r][emitted[r]].tolist()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-config", default=None)
    args = p.parse_args()
    result: dict = {"run_dir": args.run_dir, "step": args.step}

    setup, params, _ = runs.load_run(args.run_dir, args.step)
    qsetup, qparams = runs.load_run(args.run_dir, args.step, quant="int8")[:2]
    result["quantised"] = quantize.quantized_names(params)

    # held-out bits per byte, each window once
    for name, quant in (("f32", None), ("int8", "int8")):
        scored = runs.score_held_out(args.run_dir, args.step, 0, quant)
        result[f"heldout_bpb_{name}"] = round(scored["eval_bpb"], 5)
        result[f"heldout_loss_{name}"] = round(scored["eval_loss"], 5)
    result["heldout_bpb_change"] = round(result["heldout_bpb_int8"] - result["heldout_bpb_f32"], 5)

    # logits of the first held-out batch
    cfg = setup.cfg
    data = runs.load_data(cfg, __import__("pathlib").Path(args.run_dir))
    B, T = cfg.train.batch_size, cfg.model.seq_len
    batch = data_loader.assemble(
        setup.batch_sharding, (B, T), lambda a, b: data.val_batch(0, B, a, b)
    )
    forward = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t))
    a = np.asarray(forward(params, batch["inputs"]))[..., : data.tokenizer.vocab_size]
    b = np.asarray(forward(qparams, batch["inputs"]))[..., : data.tokenizer.vocab_size]
    d = a - b
    result["logits"] = {
        "max_abs_diff": float(np.abs(d).max()),
        "rms_diff": float(np.sqrt(np.mean(d**2))),
        "rms_f32": float(np.sqrt(np.mean(a**2))),
        "std_f32": float(a.std()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }

    # greedy continuations of held-out prompts (the first 32 tokens of held-out windows)
    windows = np.asarray(batch["inputs"])
    extra = args.prompts - len(windows)
    if extra > 0:
        more = data_loader.assemble(
            setup.batch_sharding, (B, T), lambda a, b: data.val_batch(1, B, a, b)
        )
        windows = np.concatenate([windows, np.asarray(more["inputs"])])
    prompts = [w[:32].tolist() for w in windows[: args.prompts]]
    f32_out, _ = greedy(setup, params, prompts, 32)
    int8_out, _ = greedy(qsetup, qparams, prompts, 32)
    same = [
        sum(x == y for x, y in zip(f, q, strict=False))
        for f, q in zip(f32_out, int8_out, strict=True)
    ]
    first = [next((i for i, (x, y) in enumerate(zip(f, q, strict=False)) if x != y), len(f))
             for f, q in zip(f32_out, int8_out, strict=True)]  # fmt: skip
    result["greedy"] = {
        "prompts": len(prompts),
        "new_tokens": 32,
        "token_agreement": sum(same) / sum(len(f) for f in f32_out),
        "identical_continuations": sum(f == q for f, q in zip(f32_out, int8_out, strict=True)),
        "mean_tokens_before_first_difference": float(np.mean(first)),
    }

    # memory of the decode program (8 rows)
    result["memory_decode_8_rows"] = {
        "f32": decode_memory(setup, params, 8),
        "int8": decode_memory(qsetup, qparams, 8),
    }

    # speed: interleaved
    speed = {}
    for rows in (1, 8):
        rows_prompts = (prompts * 8)[:rows]
        for s, prm in ((setup, params), (qsetup, qparams)):
            greedy(s, prm, rows_prompts, 4)  # compile
        times = {"f32": [], "int8": []}
        for _ in range(args.rounds):
            for name, (s, prm) in (("f32", (setup, params)), ("int8", (qsetup, qparams))):
                out, seconds = greedy(s, prm, rows_prompts, args.new)
                times[name].append(sum(len(o) for o in out) / seconds)
        speed[f"{rows}_rows"] = {
            **{f"{k}_tokens_per_s": round(statistics.median(v), 1) for k, v in times.items()},
            "int8_over_f32": round(
                statistics.median(times["int8"]) / statistics.median(times["f32"]), 3
            ),
        }
    result["decode_speed"] = speed

    if args.memory_config:
        big = config.load(args.memory_config)
        big = big.model_copy(update={"mesh": big.mesh.on_local_devices()})
        bsetup = steps.build_model(big, jax.devices()[:1])
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bsetup.abstract_params
        )
        fparams = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) + 0.02, shapes)
        qbsetup, qbparams = quantize.quantize_setup(bsetup, fparams, "int8")
        result["memory_config"] = {
            "config": args.memory_config,
            "f32": decode_memory(bsetup, fparams, 1),
            "int8": decode_memory(qbsetup, qbparams, 1),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
