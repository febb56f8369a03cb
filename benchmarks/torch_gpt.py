"""The gptjax GPT-2 in PyTorch, for CPU side-by-side speed checks (not a runtime dependency).

Same architecture and training step as gptjax for a given config: token + learned position
embeddings, pre-LayerNorm blocks (eps 1e-5), tanh GELU, MLP width d_ff, final LayerNorm, output
projection tied to the token table; AdamW (decay on matrices and embeddings only), global-norm
clipping, mean cross-entropy. Batches are the same synthetic uniform-random tokens `gptjax bench`
uses. Prints one JSON line in the shape of `gptjax bench` (the fields that apply).

    python benchmarks/torch_gpt.py configs/cpu_small.yaml [key=value ...] [--dtype bfloat16]

Install torch from the local CPU wheel (`pip install torch==2.13.0`), never a CUDA build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptjax import config
from gptjax.core import flops
from gptjax.tools import bench

DECAYED_SUFFIXES = (
    "wte.weight",
    "wpe.weight",
    "qkv.weight",
    "out.weight",
    "fc.weight",
    "proj.weight",
)


class Block(nn.Module):
    """One pre-LayerNorm GPT-2 block on x [B, T, D]."""

    def __init__(self, d_model: int, n_head: int, d_ff: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model, eps=1e-5)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model, eps=1e-5)
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(a.transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 with a tied output head; forward(tokens [B, T]) -> logits [B, T, V]."""

    def __init__(self, cfg: config.ModelConfig):
        super().__init__()
        D, L = cfg.d_model, cfg.n_layer
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.wpe = nn.Embedding(cfg.n_positions, D)
        self.blocks = nn.ModuleList(Block(D, cfg.n_head, cfg.ff) for _ in range(L))
        self.ln_f = nn.LayerNorm(D, eps=1e-5)
        residual_std = 0.02 / math.sqrt(2 * L)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            elif name.endswith(("out.weight", "proj.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=0.01 if name.startswith("wpe") else 0.02)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe.weight[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T


def windows(batch):
    """The [B, T+1] token windows a batch dict was cut from (inputs plus the last target)."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def make_trainer(cfg: config.Config, dtype: str):
    """A closure that runs one training step on tokens [B, T+1] (int64) and returns the loss."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    o = cfg.optim
    decayed = [p for n, p in model.named_parameters() if n.endswith(DECAYED_SUFFIXES)]
    other = [p for n, p in model.named_parameters() if not n.endswith(DECAYED_SUFFIXES)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    autocast = dtype == "bfloat16"

    def step(tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        return loss

    return step, sum(p.numel() for p in model.parameters())


def run(cfg: config.Config, steps: int, warmup: int, dtype: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    step, n_params = make_trainer(cfg, dtype)
    batches = [
        torch.from_numpy(windows(bench.synthetic_rows(cfg, s, 0, cfg.train.batch_size))).long()
        for s in range(4)
    ]
    for k in range(warmup):
        step(batches[k % 4])
    times = []
    for k in range(steps):
        begin = time.perf_counter()
        loss = float(step(batches[(k + warmup) % 4]).detach())
        times.append(time.perf_counter() - begin)
    B, T = cfg.train.batch_size, cfg.model.seq_len
    step_s = statistics.median(times)
    flops_token = flops.flops_per_token(cfg.model)
    return {
        "framework": f"torch {torch.__version__}",
        "dtype": dtype,
        "threads": threads,
        "batch_size": B,
        "seq_len": T,
        "params": n_params,
        "steps": steps,
        "warmup": warmup,
        "step_time_median_s": step_s,
        "tokens_per_s": B * T / step_s,
        "flops_per_token": flops_token,
        "flops_formula": bench.FLOPS_FORMULA,
        "model_flops_per_s": B * T / step_s * flops_token,
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    cfg = config.load(args.config, args.overrides)
    print(json.dumps(run(cfg, args.steps, args.warmup, args.dtype, args.threads)), flush=True)


if __name__ == "__main__":
    main()
