"""`gptjax` / `python -m gptjax`: train, sample, chat, serve, eval, export, import, bench, plan,
plot, data, launch, sweep.

A user's mistake prints one line (`gptjax: error: ...`) and exits 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from gptjax.config import ConfigError
from gptjax.data import DataError
from gptjax.errors import UserError
from gptjax.experiments.cli import add_arguments as add_sweep_arguments
from gptjax.inference.feedback import add_flags as feedback_flags
from gptjax.inference.settings import DEFAULT, Finish, Settings
from gptjax.tools.launch import add_arguments as add_launch_arguments


def _train(args) -> int:
    import jax

    from gptjax import config
    from gptjax.training import debug as debug_mode
    from gptjax.training import loop

    debug = ["debug.enabled=true"] if args.debug else []
    cfg = config.load(args.config, [*args.overrides, *debug])
    given = {item.split("=", 1)[0].strip() for item in args.overrides}
    cfg, capped = debug_mode.cap_steps(cfg, given)
    if capped:  # debug mode runs in one process
        print(capped, file=sys.stderr)
    task_eval = None
    if cfg.train.eval_tasks:  # resolved now: an unknown task is one line before any training
        from gptjax.evaluation.during_training import TrainingTasks

        task_eval = TrainingTasks(cfg)
    result = loop.train(cfg, progress=not args.no_progress, task_eval=task_eval)
    if jax.process_index() == 0:  # one summary line per run, not per process
        print(json.dumps(result))
    return 0


def _launch(args) -> int:
    from gptjax.tools import launch

    return launch.run_from_args(args)


def _read_prompts(args) -> list[str]:
    if args.prompt_file is None:
        return [args.prompt]
    path = Path(args.prompt_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise DataError(f"--prompt-file {path}: {reason}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"--prompt-file {path} holds no prompts (one per line)")
    return prompts


def _sample_devices(args):
    """`--devices N --tensor T`: N local devices, prompts over N/T, each model's heads over T."""
    import jax

    available = jax.local_devices()
    if not 1 <= args.devices <= len(available):
        raise ConfigError(f"--devices {args.devices}: this process has {len(available)}")
    if args.tensor < 1 or args.devices % args.tensor:
        raise ConfigError(f"--tensor {args.tensor} does not divide --devices {args.devices}")
    mesh = {"data": args.devices // args.tensor, "fsdp": 1, "tensor": args.tensor}
    return available[: args.devices], mesh


def _settings(args, least_new: int = 1) -> Settings:
    """The generation flags (`_add_generation_flags`) as Settings, checked before loading."""
    stop = getattr(args, "stop", None)
    settings = Settings(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        () if stop is None else (stop,),
    )
    settings.check(least_new)
    return settings


def _sample(args) -> int:
    from gptjax.inference import generate
    from gptjax.training import runs

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples}: use 1 or more")
    prompts = [p for p in _read_prompts(args) for _ in range(args.num_samples)]
    settings = _settings(args, least_new=0)
    devices, mesh = _sample_devices(args)
    setup, params, tokenizer = runs.load_run(args.run_dir, args.step, devices, mesh, args.quantize)
    pieces = generate.generate(setup, params, tokenizer, prompts, **dataclasses.asdict(settings))
    context = setup.cfg.model.seq_len
    if len(prompts) == 1:  # stream
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        new, finish = 0, None
        for piece in pieces:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            new, finish = new + len(piece.ids), piece.finish or finish
        sys.stdout.write("\n")
        sys.stdout.flush()
        if finish == Finish.CONTEXT and new < args.max_new_tokens:
            print(f"gptjax: {_context_ended(context, new)}", file=sys.stderr)
        return 0
    per_prompt = args.num_samples
    texts = [""] * len(prompts)
    new = [0] * len(prompts)
    finished: list[str | None] = [None] * len(prompts)
    shown = 0
    for piece in pieces:  # print each sample once it and those before it are complete
        texts[piece.row] += piece.text
        new[piece.row] += len(piece.ids)
        finished[piece.row] = finished[piece.row] or piece.finish
        while shown < len(prompts) and finished[shown]:
            label = f"prompt {shown // per_prompt + 1}"
            if per_prompt > 1:
                label += f", sample {shown % per_prompt + 1}"
            if finished[shown] == Finish.CONTEXT and new[shown] < args.max_new_tokens:
                label += f" ({_context_ended(context, new[shown])})"
            print(f"--- {label} ---")
            print(prompts[shown] + texts[shown], flush=True)
            shown += 1
    return 0


def _context_ended(context: int, new: int) -> str:
    """Why a sample stopped before --max-new-tokens: the model's context was full."""
    return (
        f"the {context}-token context (model.seq_len, the prompt included) ended the sample "
        f"after {new} new tokens"
    )


def _chat(args) -> int:
    from gptjax.inference import terminal
    from gptjax.inference.chatbot import Chatbot
    from gptjax.training import runs

    settings = _settings(args)
    devices, mesh = _sample_devices(args)
    bot = Chatbot(args.run_dir, args.step, devices=devices, mesh=mesh, quant=args.quantize)
    if not runs.learned_chat(args.run_dir):
        logging.getLogger("gptjax").warning(
            "%s was not fine-tuned on conversations (its data.source is not a chat source), so "
            "it has not learned the chat template: expect replies that do not follow it "
            "(docs/chat.md: fine-tune with configs/chat.yaml)",
            args.run_dir,
        )
    return terminal.run(bot, settings, args.system)


def _serve(args) -> int:
    from gptjax.inference import access, feedback, serve

    keys = access.load_keys(args.api_key, args.api_key_file, os.environ)
    limits = access.Limits(
        args.max_body_bytes,
        args.max_prompts,
        args.max_stops,
        args.max_tokens,
        args.body_timeout,
        args.keep_alive_timeout,
        args.max_batch,
        args.max_queue,
        args.request_timeout,
    )
    limits.check()
    access.exposure(args.host, keys, args.allow_unauthenticated)  # before loading devices
    devices, mesh = _sample_devices(args)
    return serve.serve(
        args.run_dir,
        args.host,
        args.port,
        args.step,
        devices=devices,
        mesh=mesh,
        keys=keys,
        allow_unauthenticated=args.allow_unauthenticated,
        limits=limits,
        quant=args.quantize,
        feedback=feedback.options(args),
    )


def _eval(args) -> int:
    if args.tasks and args.harness:
        raise ConfigError("give --tasks (gptjax's scoring) or --harness (lm-eval's), not both")
    if args.harness:
        from gptjax.evaluation import harness

        devices, mesh = _sample_devices(args)
        result = harness.evaluate_run(
            args.run_dir,
            [name for name in args.harness.split(",") if name],
            shots=args.shots if args.shots else None,
            limit=args.limit,
            step=args.step,
            include_path=args.include_path,
            devices=devices,
            mesh=mesh,
            quant=args.quantize,
        )
        print(json.dumps(result, default=str))
        return 0
    if not args.tasks:
        from gptjax.training import runs

        print(json.dumps(runs.score_held_out(args.run_dir, args.step, args.batches, args.quantize)))
        return 0
    from gptjax.evaluation import run

    names = [name for name in args.tasks.split(",") if name]
    devices, mesh = _sample_devices(args)
    result = run.evaluate_run(
        args.run_dir,
        names,
        shots=args.shots,
        limit=args.limit,
        step=args.step,
        seed=args.seed,
        unconditional=args.unconditional,
        devices=devices,
        mesh=mesh,
        quant=args.quantize,
    )
    print(json.dumps(result))
    return 0


def _export(args) -> int:
    if args.format == "hf":
        from gptjax.interop import hf

        out = hf.export_run(args.run_dir, args.out, args.step, args.model_type)
    else:
        from gptjax.training import runs

        out = runs.export(args.run_dir, args.out, args.step)
    print(json.dumps({"exported": str(out)}))
    return 0


def _import(args) -> int:
    from gptjax.interop import hf

    run_dir = hf.import_run(args.directory, args.run_dir, args.overrides)
    print(json.dumps({"imported": str(args.directory), "run_dir": str(run_dir)}))
    return 0


def _data_prepare(args) -> int:
    from gptjax import config
    from gptjax.data import pipeline
    from gptjax.data import tokenizer as tok
    from gptjax.training import runs

    cfg = config.load(args.config, args.overrides)
    tokenizer = tok.find(cfg.run_dir)  # a run keeps its tokenizer
    if tokenizer is None and cfg.train.init_from:  # a new fine-tuning run: the source's
        tokenizer = tok.find(runs.init_source(cfg)[0])
    if cfg.data.mixture is not None:  # one line per source
        from gptjax.data import mixture

        directories = mixture.prepare(
            cfg.data, cfg.model.seq_len, tokenizer, cfg.model.vocab_size, not args.no_progress
        )
    else:
        directories = [
            pipeline.prepare(
                cfg.data,
                cfg.model.seq_len,
                tokenizer,
                max_vocab=cfg.model.vocab_size,
                progress=not args.no_progress,
            )
        ]
    for directory in directories:
        meta = json.loads((directory / "meta.json").read_text())
        print(json.dumps({"directory": str(directory), **meta}))
    return 0


def _prefs_build(args) -> int:
    """`gptjax prefs build SOURCE --out FILE`: offline preference pairs (docs/preference.md)."""
    from gptjax.data import prefs

    if args.rejected == "sample" and not args.run:
        raise ConfigError("--rejected sample needs --run RUN (the model whose replies lose)")
    conversations = prefs.conversations_of(args.source)
    pairs = prefs.from_conversations(conversations, args.pair_seed, args.history, args.max_pairs)
    dropped = 0
    if args.rejected == "sample":
        from gptjax.inference import pairs as sampled_pairs

        pairs, dropped = sampled_pairs.sampled(args.run, pairs, _settings(args))
    prefs.write(args.out, pairs)
    summary = {"out": str(args.out), "pairs": len(pairs), "conversations": len(conversations)}
    print(json.dumps({**summary, "rejected": args.rejected, "dropped": dropped}))
    return 0


def _score(args) -> int:
    """`gptjax score RUN PAIRS`: a reward model's accuracy and margin on pairs (one JSON line)."""
    from gptjax.training import align

    result = align.score(args.run_dir, args.pairs, args.step)
    if not args.per_pair:
        result.pop("scores")
    print(json.dumps(result))
    return 0


def _data_plan(args) -> int:
    from gptjax import config
    from gptjax.config import MixtureSource
    from gptjax.data import tokenizer as tok
    from gptjax.training import runs

    cfg = config.load(args.config, args.overrides)
    if cfg.data.mixture is None:  # one source: a mixture of one (the same caches)
        one = [MixtureSource(source=cfg.data.source, weight=1.0)]
        cfg.data = cfg.data.model_copy(update={"mixture": one})
    tokenizer = tok.find(cfg.run_dir)
    if tokenizer is None and cfg.train.init_from:
        tokenizer = tok.find(runs.init_source(cfg)[0])
    data = runs.load_data(cfg, Path(cfg.run_dir), not args.no_progress, tokenizer)
    print(runs.mixture_table(cfg, data))
    return 0


def _bench(args) -> int:
    from gptjax import config
    from gptjax.tools import bench

    sizes = [None]
    if args.batch_sizes:
        try:
            sizes = [int(size) for size in args.batch_sizes.split(",")]
        except ValueError:
            raise ConfigError(
                f"--batch-sizes {args.batch_sizes!r}: use comma-separated integers, e.g. 8,16,32"
            ) from None
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("bench needs --steps >= 1 and --warmup >= 0")
    measured = 0
    for size in sizes:
        extra = [] if size is None else [f"train.batch_size={size}"]
        cfg = config.load(args.config, [*args.overrides, *extra])
        result = bench.run(cfg, timed=args.steps, warmup=args.warmup, data=args.data)
        print(json.dumps(result), flush=True)
        if "error" in result:  # out of memory: larger batches will not fit either
            break
        measured += 1
    return 0 if measured else 3


def _plot(args) -> int:
    from gptjax.tools import plot

    out = plot.plot_run(args.run_dir, args.out)
    print(out)
    return 0


def _plan(args) -> int:
    from gptjax.tools import plan

    return plan.run(args)


def _add_mesh_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--devices", type=int, default=1, help=f"local devices to {verb} on")
    p.add_argument("--tensor", type=int, default=1, help="of them, split each model's heads")


def _add_quantize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: matmul weights as int8 with per-channel scales (docs/compression.md)",
    )


def _add_model_flags(p: argparse.ArgumentParser, verb: str) -> None:
    """Which checkpoint of the run, on which devices (`_sample_devices`), quantised or not."""
    _add_mesh_flags(p, verb)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    _add_quantize_flag(p)


def _add_generation_flags(p: argparse.ArgumentParser, each: str) -> None:
    """The flags of `_settings` (defaults: inference/settings.py) and `_add_model_flags`."""
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT.max_new_tokens, help=each)
    p.add_argument("--temperature", type=float, default=DEFAULT.temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=DEFAULT.top_k, help="0: no top-k")
    p.add_argument("--top-p", type=float, default=DEFAULT.top_p, help="1: no nucleus cut")
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    _add_model_flags(p, "generate")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Access and limits of `gptjax serve` (gptjax/inference/access.py, docs/chat.md)."""
    from gptjax.inference.access import DEFAULT_LIMITS as limits
    from gptjax.inference.access import KEY_ENV

    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (also {KEY_ENV}; visible in ps: prefer those)",
    )
    p.add_argument("--api-key-file", default=None, help="accepted keys, one per line")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback --host without a key (otherwise refused)",
    )
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="else 413")
    p.add_argument("--max-prompts", type=int, default=limits.max_prompts, help="per request")
    p.add_argument("--max-stops", type=int, default=limits.max_stops, help="stop strings")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default context)")
    p.add_argument(
        "--body-timeout", type=float, default=limits.body_timeout, help="seconds, else 408"
    )
    p.add_argument(
        "--keep-alive-timeout", type=float, default=limits.keep_alive, help="idle seconds"
    )
    p.add_argument(
        "--max-batch", type=int, default=limits.max_batch, help="requests generated together"
    )
    p.add_argument("--max-queue", type=int, default=limits.max_queue, help="waiting; else 503")
    p.add_argument(
        "--request-timeout", type=float, default=limits.request_timeout, help="seconds per request"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gptjax", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--debug",
        action="store_true",
        help="one device, NaN checks, compile log, parameter table, step timings (debug.*)",
    )
    p.set_defaults(run=_train)

    p = commands.add_parser(
        "launch", help="start N processes on this machine (or show what a cluster gives)"
    )
    add_launch_arguments(p)
    p.set_defaults(run=_launch)

    p = commands.add_parser(
        "sample", help="continue prompts with a trained run (streams a single prompt)"
    )
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="default: start a new document")
    p.add_argument("--prompt-file", default=None, help="one prompt per line, all in one batch")
    _add_generation_flags(p, "per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", default=None, help="stop a sample at this text (not printed)")
    p.set_defaults(run=_sample)

    p = commands.add_parser("chat", help="talk to a chat model in the terminal (streaming)")
    p.add_argument("run_dir")
    p.add_argument("--system", default=None, help="a system message to start with")
    _add_generation_flags(p, "per reply")
    p.set_defaults(run=_chat)

    p = commands.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions)")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    _add_serve_flags(p)
    feedback_flags(p)
    _add_model_flags(p, "generate")
    p.set_defaults(run=_serve)

    p = commands.add_parser(
        "eval", help="validation loss, perplexity and bits per byte; or --tasks accuracy"
    )
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--batches", type=int, default=0, help="default: the whole validation set")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated built-in task names or task files/directories (docs/evaluation.md)",
    )
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each one")
    p.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
    p.add_argument("--seed", type=int, default=1234, help="draws the few-shot examples")
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="also acc_uncond: GPT-3's normalisation by p(choice | 'Answer:')",
    )
    p.add_argument(
        "--harness",
        default="",
        help="comma-separated lm-eval task names or gptjax task files, run by lm-eval itself "
        "(needs the [eval] extra)",
    )
    p.add_argument("--include-path", default=None, help="--harness: a folder of lm-eval YAML")
    _add_mesh_flags(p, "score")
    _add_quantize_flag(p)
    p.set_defaults(run=_eval)

    p = commands.add_parser(
        "export", help="a run's weights for elsewhere: params.npz, or a Hugging Face model dir"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument(
        "--format",
        choices=("npz", "hf"),
        default="npz",
        help="npz: params.npz + config.yaml; hf: model.safetensors + config.json + tokenizer "
        "for transformers, as the model_type that computes the run's block (needs the [hf] extra)",
    )
    p.add_argument(
        "--model-type",
        default=None,
        help="hf: the Hugging Face model_type to write (default: the one that computes the "
        "block; openai-gpt, gpt2, gpt_neo, llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, "
        "gpt_oss)",
    )
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "import", help="a run at step 0 from another format: `import hf DIR --run-dir RUN`"
    )
    p.add_argument(
        "format",
        choices=("hf",),
        help="hf: a local Hugging Face directory (model_type openai-gpt, gpt2, gpt_neo, llama, "
        "mistral, qwen2, qwen3, mixtral, qwen3_moe or gpt_oss)",
    )
    p.add_argument("directory", help="holds config.json, the weights and the tokenizer")
    p.add_argument("--run-dir", required=True, help="the new run directory (must not exist)")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value for the run, e.g. model.seq_len=256"
    )
    p.set_defaults(run=_import)

    p = commands.add_parser("bench", help="steady-state training throughput; one JSON line")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.remat=full")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps after the compile")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument(
        "--batch-sizes",
        default="",
        help="comma-separated train.batch_size values, one JSON line each; stops at out-of-memory",
    )
    p.set_defaults(run=_bench)

    p = commands.add_parser("plot", help="PNG of loss, eval loss, lr, tokens/s and MFU vs step")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    p.set_defaults(run=_plot)

    p = commands.add_parser("plan", help="params, FLOPs/token and bytes per device on a mesh")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. mesh.fsdp=8")
    p.add_argument("--devices", type=int, default=None, help="plan for N (fake CPU) devices")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--params", action="store_true", help="also a table of every parameter")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA compile (analytic only)")
    p.add_argument(
        "--target",
        default=None,
        help="compile for N mock GPUs with XLA's GPU compiler: h100|h200|a100[:N] or a "
        "GpuTargetConfig text file[:N] (8 per host; needs the gpu-plan extra)",
    )
    p.add_argument(
        "--generate", action="store_true", help="with --target: also the prefill and decode steps"
    )
    p.add_argument(
        "--rows", type=int, default=None, help="with --generate: rows to decode (default: fewest)"
    )
    p.set_defaults(run=_plan)

    p = commands.add_parser("data", help="data tools: `data prepare CONFIG` caches packed tokens")
    data_commands = p.add_subparsers(dest="data_command", required=True)
    p = data_commands.add_parser(
        "prepare", help="write documents, train the tokenizer, pack tokens (reuses the cache)"
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.source=text_dir:DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_data_prepare)
    p = data_commands.add_parser(
        "plan", help="the mixture's table: documents, tokens, weight, epochs in train.steps"
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=1000")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_data_plan)

    p = commands.add_parser("score", help="a reward model's pair accuracy and margin on PAIRS")
    p.add_argument("run_dir", help="a run trained with train.objective=reward")
    p.add_argument("pairs", help="preference pairs JSONL (docs/preference.md)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument("--per-pair", action="store_true", help="also each pair's two scores")
    p.set_defaults(run=_score)

    p = commands.add_parser("prefs", help="preference pairs: `prefs build SOURCE --out FILE`")
    prefs_commands = p.add_subparsers(dest="prefs_command", required=True)
    p = prefs_commands.add_parser(
        "build", help="pairs from conversations: chosen the real reply, rejected another's"
    )
    p.add_argument("source", help="a conversation source: chitchat or chat:PATH")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument(
        "--rejected",
        choices=("other", "sample"),
        default="other",
        help="other: a reply from another conversation; sample: --run's own reply",
    )
    p.add_argument("--run", default=None, help="--rejected sample: the run that answers")
    p.add_argument("--history", type=int, default=3, help="messages kept before the reply")
    p.add_argument("--max-pairs", type=int, default=None, help="default: one per conversation")
    p.add_argument("--pair-seed", type=int, default=0, help="draws the turns and rejections")
    _add_generation_flags(p, "per sampled reply")
    p.set_defaults(run=_prefs_build, max_new_tokens=48)

    p = commands.add_parser(
        "sweep", help="scaling experiments: sweep plan|run|status|report|fit|emit SPEC"
    )
    add_sweep_arguments(p)
    return top


def _setup_logging() -> None:
    """gptjax's own warnings as `gptjax: warning: ...` lines on stderr."""
    logger = logging.getLogger("gptjax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gptjax: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    top = parser()
    args, extra = top.parse_known_args(argv)
    # `train CONFIG --debug a=1 b=2`: argparse leaves overrides that follow a flag unparsed.
    if extra and hasattr(args, "overrides") and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except UserError as error:
        print(f"gptjax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130


def command() -> int:
    """The `gptjax` console script and `python -m gptjax`: the compilation cache on, then main."""
    from gptjax import compile_cache

    compile_cache.enable()
    return main()


if __name__ == "__main__":
    sys.exit(command())
