"""Preference pairs whose rejected reply is the model's own (`gptjax prefs build --rejected
sample --run RUN`): each pair's conversation is answered by the run (a sample at the given
settings, the prompts generated together in batches), and that reply replaces `rejected`. A pair
whose sampled reply equals the chosen one, or is empty, is dropped. Conversations longer than the
context keep their newest messages (Chatbot.fit)."""

from __future__ import annotations

from pathlib import Path

from gptjax.inference.chatbot import Chatbot
from gptjax.inference.generate import generate
from gptjax.inference.settings import Settings


def sampled(run_dir: str | Path, pairs: list[dict], settings: Settings, batch: int = 32):
    """`pairs` with `rejected` replaced by the run's own replies; (pairs, dropped)."""
    bot = Chatbot(run_dir)
    stop_ids = [] if bot.template.end_id is None else [bot.template.end_id]
    out, dropped = [], 0
    for start in range(0, len(pairs), batch):
        part = pairs[start : start + batch]
        prompts = [bot.prompt_ids(bot.fit(p["messages"], settings.max_new_tokens)) for p in part]
        texts = [""] * len(part)
        for piece in generate(
            bot.setup,
            bot.params,
            bot.tokenizer,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed + start,
            stop=None if stop_ids else ["<|end|>"],
            stop_ids=stop_ids,
        ):
            texts[piece.row] += piece.text
        for pair, text in zip(part, texts, strict=True):
            text = text.strip()
            if not text or text == pair["chosen"]:
                dropped += 1
                continue
            out.append({**pair, "rejected": text})
    return out, dropped
