"""`gptjax serve` under load: continuous batching against one request at a time.

Starts two servers of one run, `--max-batch B` (default 16) and `--max-batch 1` (the one-at-a-time
queue: every request waits for the one before it), and drives each with the official `openai`
client (async): C concurrent clients (1, 4, 16), each sending streamed completions one after
another. The two servers are measured interleaved (batched, then one-at-a-time, at each C, for
--rounds rounds), so a load that the machine's other users put on the CPU falls on both alike.

Reports per (server, C): aggregate tokens/s (every generated token over the wall time of the
level), p50/p95 request latency and time to first token (seconds), and the speed-up of C clients
over one client on the same server.

    python benchmarks/serve_load.py RUN_DIR [--requests 4] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def ", "import ", "class ", "for i in ", "return ", "if x ", "# A ", "with open("]


def start(run_dir: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gptjax", "serve", run_dir, "--port", "0",
         "--max-batch", str(max_batch)],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    for line in process.stderr:
        if "serving" in line:
            port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1)
            return process, f"http://127.0.0.1:{port}/v1"
    raise SystemExit(f"the server (max batch {max_batch}) did not start")


async def one_request(client, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, tokens) of one streamed completion."""
    began = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model="m", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.8,
        seed=i, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - began
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - began
    return (first if first is not None else latency), latency, tokens


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` clients, each sending `requests` requests one after another."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    async def user(c: int):
        return [await one_request(client, c * 1000 + r, max_tokens) for r in range(requests)]

    began = time.perf_counter()
    done = [x for per in await asyncio.gather(*(user(c) for c in range(clients))) for x in per]
    wall = time.perf_counter() - began
    await client.close()
    ttft, latency, tokens = zip(*done, strict=True)
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1]
    return {
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_latency_s": q(latency, 50),
        "p95_latency_s": q(latency, 95),
        "p50_ttft_s": q(ttft, 50),
        "p95_ttft_s": q(ttft, 95),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    servers = {}
    try:
        for name, rows in (("batched", args.max_batch), ("one at a time", 1)):
            servers[name] = start(args.run_dir, rows)
        results: dict = {name: {c: [] for c in levels} for name in servers}
        for _, url in servers.values():  # compile (the prompts' bucket) before measuring
            asyncio.run(level(url, 2, 1, 4))
        for _ in range(args.rounds):
            for c in levels:
                for name, (_, url) in servers.items():
                    results[name][c].append(
                        asyncio.run(level(url, c, args.requests, args.max_tokens))
                    )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    cores = os.cpu_count()
    print(f"{cpu_name()}, {cores} cores (shared with other work: compare the ratios)")
    print(f"{args.requests} streamed requests per client, up to {args.max_tokens} tokens each, "
          f"temperature 0.8; best of {args.rounds} interleaved rounds (by tokens/s)\n")  # fmt: skip
    print("| server | clients | tokens/s | vs 1 client | p50 / p95 latency s | p50 / p95 TTFT s |")
    print("|---|---:|---:|---:|---:|---:|")
    table = {}
    for name in servers:
        best = {c: max(results[name][c], key=lambda r: r["tokens_per_s"]) for c in levels}
        table[name] = best
        for c in levels:
            r = best[c]
            print(
                f"| {name} | {c} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / best[levels[0]]['tokens_per_s']:.2f}x | "
                f"{r['p50_latency_s']:.2f} / {r['p95_latency_s']:.2f} | "
                f"{r['p50_ttft_s']:.3f} / {r['p95_ttft_s']:.3f} |"
            )
    top = levels[-1]
    ratio = table["batched"][top]["tokens_per_s"] / table["one at a time"][top]["tokens_per_s"]
    print(f"\nat {top} clients: batched / one at a time = {ratio:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_name(), "cores": cores, "rounds": results}, indent=1)
        )


if __name__ == "__main__":
    main()
