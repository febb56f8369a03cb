"""Scored completions for `gptjax serve`'s /v1/completions: `echo`, `logprobs`, `max_tokens: 0`
and lists of prompts (text or token ids), in OpenAI's legacy completions shape, so that
lm-evaluation-harness's `local-completions` model scores log-likelihood tasks over HTTP.

A choice's `logprobs` (with `logprobs: K`, 0 <= K <= 20):
    tokens          the text each token adds (the echoed prompt's, then the generated ones)
    token_logprobs  log p(token | the tokens before it), nats; None for the first token of an
                    echoed prompt (nothing comes before it)
    top_logprobs    the K likeliest next tokens at each position, {text: log-prob} (None where
                    token_logprobs is None); a token that is not whole text on its own (a
                    piece of a character's UTF-8 bytes) is named <|token:ID|>
    text_offset     where each token's text starts in the choice's `text`
Log-probabilities are the model's own distribution (temperature 1, no top-k or top-p), from
gptjax/evaluation/loglik.py's scorer run over prompt + completion once: the same numbers
`gptjax eval` and the in-process lm-eval adapter use. Generation (max_tokens > 0) is the
server's usual generator, all the request's prompts in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gptjax.evaluation.loglik import Scorer
from gptjax.inference import generate
from gptjax.inference.settings import Finish


class Completions:
    """Answers scored completion requests for one chatbot (one model), on its worker thread."""

    def __init__(self, bot):
        self.bot = bot
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:  # built at the first request that asks for log-probs
            self._scorer = Scorer(self.bot.setup, self.bot.params)
        return self._scorer

    def generate(self, prompts: Sequence[list[int]], settings) -> list[tuple[list[int], str, str]]:
        """(new ids, new text, finish reason) for each prompt, generated in one batch (an
        end-of-document token that ends a row is one of its ids, as OpenAI counts it)."""
        out = [([], "", "length") for _ in prompts]
        pieces = generate.generate(
            self.bot.setup,
            self.bot.params,
            self.bot.tokenizer,
            list(prompts),
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=list(settings.stop) or None,
            chunk=self.bot.chunk,
        )
        for piece in pieces:
            ids, text, finish = out[piece.row]
            ids = ids + list(piece.ids)
            if piece.finish is Finish.EOD:  # the end-of-document token is a token of the reply
                ids.append(self.bot.tokenizer.eod_id)
            finish = piece.finish.reply if piece.finish else finish
            out[piece.row] = (ids, text + piece.text, finish)
        return out

    def answer(
        self,
        prompts: Sequence[list[int]],
        echoes: Sequence[str],
        settings,
        echo: bool,
        logprobs: int | None,
    ) -> tuple[list[dict[str, Any]], int]:
        """(the choices, in prompt order; completion tokens in all). `settings` None: no new
        tokens (max_tokens 0); `echoes`: each prompt's text as the reply shows it."""
        greedy_one = (
            settings is not None
            and logprobs is not None
            and settings.max_new_tokens == 1
            and settings.temperature == 0
            and not settings.stop
        )
        if greedy_one:  # lm-eval's requests: the greedy token read off the scoring pass
            made, scored = self.greedy_token(prompts, echo, logprobs)
        else:
            made = [([], "", "length") for _ in prompts]
            if settings is not None:
                made = self.generate(prompts, settings)
            scored = self.score(prompts, made, echo, logprobs)
        choices = []
        for i, (prompt, (new, text, finish)) in enumerate(zip(prompts, made, strict=True)):
            head = echoes[i] if echo else ""
            choice = {"index": i, "text": head + text, "finish_reason": finish, "logprobs": None}
            if logprobs is not None:
                shown = (prompt if echo else []) + new
                choice["logprobs"] = self.logprobs(shown, echo, scored[i])
            choices.append(choice)
        return choices, sum(len(new) for new, _, _ in made)

    def score(self, prompts, made, echo: bool, logprobs: int | None) -> list:
        """(token log-probs, top ids, top log-probs) of the tokens shown, per prompt (None when
        there is nothing to score: an echoed one-token prompt, no new tokens without echo)."""
        scored: list = [None] * len(prompts)
        if logprobs is None:
            return scored
        requests, rows = [], []
        for i, (prompt, (new, _, _)) in enumerate(zip(prompts, made, strict=True)):
            # each shown token given all before it: the prompt's after its first, or the new
            context, continuation = (prompt[:1], prompt[1:] + new) if echo else (prompt, new)
            if continuation:
                requests.append((context, continuation))
                rows.append(i)
        results = self.scorer.score(requests, per_token=True, top_k=logprobs)
        for i, r in zip(rows, results, strict=True):
            scored[i] = (r.token_logprobs, r.top_ids, r.top_logprobs)
        return scored

    def greedy_token(self, prompts, echo: bool, logprobs: int):
        """One greedy new token per prompt and the log-probs, from one scoring pass over each
        prompt and a placeholder token (the distribution at its position needs only the
        prompt): the new token is the argmax there; the end-of-document token stops."""
        tokenizer = self.bot.tokenizer
        requests = [(p[:1], p[1:] + [0]) if echo else (p, [0]) for p in prompts]
        results = self.scorer.score(requests, per_token=True, top_k=max(1, logprobs))
        made, scored = [], []
        for prompt, r in zip(prompts, results, strict=True):
            token = int(r.top_ids[-1, 0])
            values = r.token_logprobs.copy()
            values[-1] = r.top_logprobs[-1, 0]
            ids, logps = r.top_ids[:, :logprobs], r.top_logprobs[:, :logprobs]
            scored.append((values, ids if logprobs else None, logps if logprobs else None))
            if token == tokenizer.eod_id:
                made.append(([token], "", "stop"))
            else:
                before = tokenizer.decode(prompt)
                text = tokenizer.decode([*prompt, token])[len(before) :]
                made.append(([token], text, "length"))
        return made, scored

    def logprobs(self, ids: list[int], echo: bool, score) -> dict[str, list]:
        """OpenAI's logprobs object for the tokens `ids` shown (`score`: the scorer's result
        for them, all but the first when `echo`; None when there is nothing to score)."""
        decode = self.bot.tokenizer.decode
        offsets = [len(decode(ids[:k])) for k in range(len(ids) + 1)]
        for k in range(len(ids) - 1, -1, -1):  # a character's bytes in pieces: never backwards
            offsets[k] = min(offsets[k], offsets[k + 1])
        whole = decode(ids)
        tokens = [whole[offsets[k] : offsets[k + 1]] for k in range(len(ids))]
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo and ids:
            values.append(None)
            tops.append(None)
        if score is not None:
            token_logprobs, top_ids, top_logprobs = score
            values += [float(v) for v in token_logprobs]
            if top_ids is None:  # logprobs: 0
                tops += [{} for _ in token_logprobs]
            else:
                for ranked, logps in zip(top_ids.tolist(), top_logprobs.tolist(), strict=True):
                    tops.append(
                        {
                            token_name(decode, t): float(v)
                            for t, v in zip(ranked, logps, strict=True)
                        }
                    )
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets[:-1],
        }


def token_name(decode, token: int) -> str:
    """A token's text, or <|token:ID|> when it is not whole text on its own."""
    text = decode([token])
    return f"<|token:{token}|>" if "\ufffd" in text or not text else text
