"""Examples per second of 4-choice multiple-choice scoring: gptjax's scorer vs lm-eval's hf
backend (transformers) on the same model, side by side on this machine's CPU.

    python benchmarks/eval_throughput.py [--examples 200] [--d-model 256 --layers 4 --heads 4]
        [--seq-len 256] [--context-tokens 100] [--batch 16] [--rounds 3] [--dir DIR]

The model: a GPT-2 of the given shape with random weights and a byte-level BPE tokenizer trained
here on a little Python source, saved as a Hugging Face directory, imported as a gptjax run
(`gptjax import hf`), and exported back (`gptjax export --format hf`): transformers reads the
export, gptjax the run, so both score the same weights. The task: `--examples` rows of about
`--context-tokens` tokens of context (words of Python source) and 4 choices of 1-4 words, as a
JSONL task (gptjax/evaluation/tasks.py) and the lm-eval YAML that reads it
(harness.task_yaml).

Timed, per round (rounds alternate the contenders; the first round of each, which compiles or
warms up, is reported apart): the whole task, gptjax `run.evaluate_task(Scorer(setup, params),
...)` (~8,192 tokens a call, one CPU device) against `lm_eval.simple_evaluate` on an `HFLM` built
once (float32, `--batch` rows a call); and the log-likelihood calls alone on the same 4N
(context, continuation) pairs, `Scorer.score` against `HFLM.loglikelihood`. The two must choose
the same answer for every example (`same_choices`); `max_loglikelihood_difference` is over the
pairs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def bpe_tokenizer(merges: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=257 + merges,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sources = [shutil.__file__, json.__file__, logging.__file__, argparse.__file__]
    tokenizer.train_from_iterator([Path(p).read_text() for p in sources], trainer)
    return tokenizer


def make_rows(tokenizer, n: int, context_tokens: int, seed: int = 0) -> list[dict]:
    words = sorted(set(Path(argparse.__file__).read_text().split()))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        context = []
        while len(tokenizer.encode(" ".join(context)).ids) < context_tokens:
            context.append(str(rng.choice(words)))
        choices = [" ".join(rng.choice(words, size=rng.integers(1, 5))) for _ in range(4)]
        label = int(rng.integers(4))
        rows.append({"context": " ".join(context), "choices": choices, "label": label})
    return rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--context-tokens", type=int, default=100)
    p.add_argument("--batch", type=int, default=16, help="lm-eval hf backend's batch_size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()

    import torch
    import transformers

    from gptjax import cli
    from gptjax.evaluation import harness, loglik, run, tasks
    from gptjax.interop import hf
    from gptjax.training import runs

    root = Path(args.dir or tempfile.mkdtemp(prefix="gptjax-eval-bench-"))
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=args.seq_len,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        eos_token_id=0,
        bos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(root / "hf")
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    run_dir = hf.import_run(root / "hf", root / "run")
    assert cli.main(["export", str(run_dir), "--format", "hf", "--out", str(root / "export")]) == 0
    path = root / "bench.jsonl"
    rows = make_rows(tokenizer, args.examples, args.context_tokens)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.read_task(path)
    name = harness.task_yaml(task, path, root)

    import lm_eval
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM

    setup, params, gtok = runs.load_run(run_dir)
    scorer = loglik.Scorer(setup, params)
    torch.set_num_threads(os.cpu_count() or 1)
    export = str(root / "export")
    hflm = HFLM(pretrained=export, dtype="float32", batch_size=args.batch, device="cpu")
    manager = lm_eval.tasks.TaskManager(include_path=str(root), include_defaults=False)

    def ours():
        summary, records = run.evaluate_task(scorer, gtok, task)
        return [r["predictions"]["acc"] for r in records], summary["acc"]

    def theirs():
        out = lm_eval.simple_evaluate(
            model=hflm, tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0
        )
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        picks = [int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) for s in samples]
        return picks, out["results"][name]["acc,none"]

    # the log-likelihood calls alone: the same (context, continuation) pairs, no task machinery
    from lm_eval.api.instance import Instance

    pairs = [
        (task.prompt(i, 0, 0), " " + c) for i, e in enumerate(task.examples) for c in e.choices
    ]
    instances = [
        Instance("loglikelihood", doc={}, arguments=pair, idx=k) for k, pair in enumerate(pairs)
    ]
    encoded = [loglik.encode_pair(gtok, *pair) for pair in pairs]

    def ours_ll():
        return [s.logprob for s in scorer.score(encoded)]

    def theirs_ll():
        return [ll for ll, _ in hflm.loglikelihood(instances, disable_tqdm=True)]

    contenders = (
        ("gptjax", ours),
        ("lm_eval_hf", theirs),
        ("gptjax_loglikelihood", ours_ll),
        ("lm_eval_hf_loglikelihood", theirs_ll),
    )
    times = {key: [] for key, _ in contenders}
    answers = {}
    for _ in range(args.rounds):
        for key, fn in contenders:
            start = time.perf_counter()
            answers[key] = fn()
            times[key].append(time.perf_counter() - start)
    gap = np.max(
        np.abs(np.subtract(answers["gptjax_loglikelihood"], answers["lm_eval_hf_loglikelihood"]))
    )
    same = answers["gptjax"][0] == answers["lm_eval_hf"][0]
    result = {
        "examples": args.examples,
        "choices": 4,
        "context_tokens": args.context_tokens,
        "model": {
            "d_model": args.d_model,
            "layers": args.layers,
            "heads": args.heads,
            "seq_len": args.seq_len,
            "vocab": config.vocab_size,
        },  # fmt: skip
        "same_choices": same,
        "max_loglikelihood_difference": float(gap),
        "acc": {k: answers[k][1] for k in ("gptjax", "lm_eval_hf")},
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }
    for key, seconds in times.items():
        steady = seconds[1:] or seconds
        result[key] = {
            "first_s": round(seconds[0], 2),
            "median_s": round(statistics.median(steady), 2),
            "examples_per_s": round(args.examples / statistics.median(steady), 1),
        }
    for ours_key, theirs_key in (
        ("gptjax", "lm_eval_hf"),
        ("gptjax_loglikelihood", "lm_eval_hf_loglikelihood"),
    ):
        result[f"speedup_{ours_key}"] = round(
            result[ours_key]["examples_per_s"] / result[theirs_key]["examples_per_s"], 2
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
