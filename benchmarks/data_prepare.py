"""Data preparation at size: gptjax's tokenise-and-pack with 1 and N worker processes, its peak
memory at two corpus sizes, and HF `tokenizers` / `tiktoken` encoding the same text as reference
rates (report, not a test).

    python benchmarks/data_prepare.py [--mb 20 200] [--workers 1 2] [--vocab 8192] [--out F.json]

The corpus is the embedded one (the running Python's standard library, ~12 MB) written out as
.txt files, repeated until it holds MB megabytes, read as `text_dir:`. One SentencePiece
tokenizer is trained once (on gptjax's default 20 MB sample) and given to every run, so each
measured run does what `gptjax data prepare` does with `data.tokenizer` set: write the documents,
then tokenise and pack into a fresh cache. Each run is its own process; its peak resident memory
is its own (VmHWM: `ru_maxrss` would carry over the parent's resident set at the fork) and its
worker processes' largest (their VmHWM, sampled). The reference encoders get the same
documents: a byte-level BPE of the same vocabulary trained by `tokenizers` on the same sample,
its `encode_batch` (Rust threads on every core), and `tiktoken` built from that BPE's ranks
(`encode_ordinary_batch`, threads). They only encode: no documents, no packing, no files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
from gptjax.config import DataConfig
from gptjax.data import array_records, pipeline

def hwm(pid="self"):
    # VmHWM (MiB): this process's own peak. Not ru_maxrss, which Linux carries over an exec
    # from the forked image, i.e. the parent's resident set at the fork.
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

workers_peak = {}
def watch_workers():
    while True:
        for task in os.listdir("/proc/self/task"):
            try:
                children = open(f"/proc/self/task/{task}/children").read().split()
            except OSError:
                continue
            for child in children:
                workers_peak[child] = max(workers_peak.get(child, 0.0), hwm(child))
        time.sleep(0.2)
threading.Thread(target=watch_workers, daemon=True).start()

corpus, cache, tokenizer, workers = sys.argv[1:5]
cfg = DataConfig(source=f"text_dir:{corpus}", cache_dir=cache, tokenizer=tokenizer,
                 workers=int(workers))
root = pipeline.cache_root(cfg)
start = time.perf_counter()
docs = array_records.open_documents(cfg, root)
len(docs.train)
t_docs = time.perf_counter() - start
start = time.perf_counter()
directory = pipeline.prepare(cfg, 1024)
t_pack = time.perf_counter() - start
meta = json.loads((directory / "meta.json").read_text())
print(json.dumps({
    "documents_s": t_docs, "pack_s": t_pack,
    "bytes": meta["train"]["bytes"] + meta["validation"]["bytes"],
    "tokens": meta["train"]["tokens"] + meta["validation"]["tokens"],
    "rss_MiB": hwm(),
    "worker_rss_MiB": max(workers_peak.values(), default=0.0),
}))
"""


def write_corpus(root: Path, megabytes: int) -> Path:
    """The stdlib documents as .txt files under root/rep*/, repeated until `megabytes` MB."""
    from gptjax.data import corpus

    if (root / "DONE").is_file():
        return root
    total, rep = 0, 0
    while total < megabytes * 1e6:
        for name, text in corpus.iter_stdlib():
            path = root / f"rep{rep:03d}" / (name.replace("/", "__") + ".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            total += len(text.encode())
            if total >= megabytes * 1e6:
                break
        rep += 1
    (root / "DONE").write_text(str(total))
    return root


def train_tokenizer(corpus: Path, work: Path, vocab: int) -> Path:
    from gptjax.config import DataConfig
    from gptjax.data import pipeline

    cfg = DataConfig(source=f"text_dir:{corpus}", cache_dir=str(work / "tok"), vocab_size=vocab)
    directory = pipeline.prepare(cfg, 1024)
    return directory / "tokenizer.model"


def gptjax_run(corpus: Path, cache: Path, tokenizer: Path, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(cache), str(tokenizer), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["MB_per_s"] = record["bytes"] / 1e6 / record["pack_s"]
    record["tokens_per_s"] = record["tokens"] / record["pack_s"]
    return record


def reference_rates(corpus: Path, vocab: int) -> dict:
    """HF tokenizers and tiktoken encoding every document of `corpus` (in memory)."""
    from gptjax.data import corpus as corpus_module

    texts = [text for _, text in corpus_module.iter_text_dir(corpus)]
    size = sum(len(t.encode()) for t in texts) / 1e6
    result = {"text_MB": size}
    try:
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        return {**result, "tokenizers": "not installed"}
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    sample, held = [], 0
    for text in texts:  # the same 20 MB cap gptjax's tokenizer trains on
        sample.append(text)
        held += len(text)
        if held > 20_000_000:
            break
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(sample, trainer)
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in bpe.encode_batch(texts))
    seconds = time.perf_counter() - start
    result["tokenizers"] = {"MB_per_s": size / seconds, "tokens_per_s": tokens / seconds}
    try:
        import tiktoken
    except ImportError:
        result["tiktoken"] = "not installed"
        return result
    unicode_to_byte = {ch: b for b, ch in enumerate(_byte_alphabet())}
    ranks = {
        bytes(unicode_to_byte[ch] for ch in piece): rank for piece, rank in bpe.get_vocab().items()
    }
    encoding = tiktoken.Encoding(
        "gptjax-bench",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={},
    )
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts))
    seconds = time.perf_counter() - start
    result["tiktoken"] = {"MB_per_s": size / seconds, "tokens_per_s": tokens / seconds}
    return result


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the ByteLevel alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gptjax-prepare-"))
    report = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "runs": []}
    corpora = {mb: write_corpus(work / f"corpus-{mb}mb", mb) for mb in args.mb}
    tokenizer = train_tokenizer(corpora[min(args.mb)], work, args.vocab)
    for mb in args.mb:
        for workers in args.workers:  # interleaved: every size with every worker count
            cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
            record = {
                "mb": mb,
                "workers": workers,
                **gptjax_run(corpora[mb], cache, tokenizer, workers),
            }
            report["runs"].append(record)
            print(
                json.dumps(
                    {k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}
                ),
                flush=True,
            )
            subprocess.run(["rm", "-rf", str(cache)], check=True)
        report[f"reference_{mb}mb"] = reference_rates(corpora[mb], args.vocab)
        print(json.dumps(report[f"reference_{mb}mb"]), flush=True)
    report["lead_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
