"""`gptjax` / `python -m gptjax`: train, sample, eval. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from gptjax.checkpoint import CheckpointError
from gptjax.config import ConfigError
from gptjax.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _train(args) -> int:
    from gptjax import config, train

    cfg = config.load(args.config, args.overrides)
    result = train.train(cfg, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def _sample(args) -> int:
    from gptjax import generate

    setup, params, tokenizer = generate.load_run(args.run_dir, args.step)
    for i in range(args.num_samples):
        text = generate.sample(
            setup,
            params,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + i,
        )
        print(text)
        if i + 1 < args.num_samples:
            print("-" * 40)
    return 0


def _eval(args) -> int:
    from gptjax import generate, train

    setup, params, _ = generate.load_run(args.run_dir, args.step)
    cfg = setup.cfg
    data = train.load_data(cfg, __import__("pathlib").Path(args.run_dir))
    eval_step = train.make_eval_step(setup, data.token_bytes)
    n_batches = args.batches or max(1, len(data.val) // cfg.train.batch_size)
    result = train.evaluate(setup, eval_step, params, data, n_batches)
    result["eval_tokens"] = n_batches * cfg.train.batch_size * cfg.model.seq_len
    print(json.dumps(result))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gptjax", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = commands.add_parser("sample", help="sample text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.set_defaults(run=_sample)

    p = commands.add_parser("eval", help="validation loss, perplexity and bits per byte")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--batches", type=int, default=0, help="default: the whole validation set")
    p.set_defaults(run=_eval)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"gptjax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
