"""`gptjax serve RUN_DIR`: the OpenAI HTTP API for one run (FastAPI + uvicorn).

    GET  /health                 {"status": "ok", "model": NAME, "context": N, "queued": K,
                                  "running": R, "max_batch": B}
    GET  /v1/models              the one model
    POST /v1/chat/completions    messages -> the assistant's reply (chat template, <|end|> stops)
    POST /v1/completions         a prompt (or a list: text or token ids) -> its continuation;
                                 echo, logprobs, max_tokens 0 (gptjax/inference/completions.py)
    GET  /tokenizer_info, POST /tokenize, /detokenize   the run's tokenizer (vLLM's shapes, which
                                 lm-eval's local-completions detects and uses)
    POST /v1/feedback            a rating of a reply this server gave, or a preferred reply ->
                                 preference pairs in RUN/feedback (gptjax/inference/feedback.py)

`stream: true` sends server-sent events (`data: {chunk}` ... `data: [DONE]`) as tokens are
generated, in OpenAI's chunk format. Supported request fields: model (any name; the run's is
reported), messages / prompt, max_tokens (max_completion_tokens), temperature, top_p, top_k,
seed, stop (a string or up to --max-stops, 4), n = 1, stream, stream_options.include_usage,
and for completions echo, logprobs (0..20) and a prompt list (up to --max-prompts, 128; not
streamed); other fields are ignored. Defaults follow OpenAI: temperature 1, top_p 1, max_tokens
16 for completions and the rest of the context for chat. A reply that reaches the end of the
context finishes with "length".

Every mistake is a 4xx JSON `{"error": {"message", "type": "invalid_request_error", "param",
"code"}}`: malformed JSON, a missing or mistyped field, an unknown role, a system message after
the first, a prompt over the context (code "context_length_exceeded"), n > 1, an unknown path.

Access and limits (gptjax/inference/access.py): with API keys every path but /health needs
`Authorization: Bearer KEY` (401); bodies are capped in size (413) and time (408); max_tokens
over --max-tokens (default the context) is a 400.

Continuous batching (gptjax/inference/batching.py): up to --max-batch (8) requests generate
together, one row each of one decode batch; a new request joins between device calls, and a
request that finishes, stops or whose client disconnects frees its row at once. Each gets the
tokens it would get alone. Up to --max-queue (64) more wait in arrival order; beyond that a
request is answered 503 with Retry-After. A request past --request-timeout (600 s, queued or
generating) is answered 504 (a stream ends with an error event). Scored completions run between
decode calls, one at a time.

    GET  /health                 adds "queued" (waiting) and "running" (rows generating)
    GET  /metrics                Prometheus text: requests, queue depth, running rows, generated
                                 tokens, time to first token and latency histograms (API key
                                 like every path but /health)
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gptjax.config import ConfigError
from gptjax.data import DataError, chat
from gptjax.errors import UserError
from gptjax.inference import batching, generate, metrics
from gptjax.inference.access import DEFAULT_LIMITS, Guard, Limits, exposure
from gptjax.inference.chatbot import Chatbot
from gptjax.inference.completions import Completions
from gptjax.inference.feedback import Feedback, FeedbackOptions
from gptjax.inference.settings import TOKENS_PER_CALL, ContextError, Settings, check_context

# --- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def stops(self, most: int = 4) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > most or any(not s for s in stops):
            raise RequestError(f"stop: give up to {most} non-empty strings", "stop")
        return tuple(stops)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def scored(self) -> bool:
        """Not one text prompt streamed or generated plainly: Completions answers it."""
        one_text = isinstance(self.prompt, str) or (
            len(self.prompt) == 1 and isinstance(self.prompt[0], str)
        )
        return self.logprobs is not None or self.max_tokens == 0 or not one_text


EOS_TEXT = "<|endoftext|>"  # the end-of-document token, as /tokenize and /tokenizer_info name it


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


class ServeError(UserError):
    """The server cannot start: its address cannot be bound."""


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    body = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    if status >= 500:
        body["type"] = "server_error"
    return JSONResponse({"error": body}, status_code=status)


def _explain(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(where) or None
    return f"{param or 'body'}: {first.get('msg')}", param


# --- the app ------------------------------------------------------------------------------------


def make_app(
    bot: Chatbot,
    keys: Iterable[str] = (),
    limits: Limits = DEFAULT_LIMITS,
    feedback: Feedback | None = None,
    engine: batching.Engine | None = None,
) -> FastAPI:
    """The app; with `keys`, every path but /health needs one (gptjax/inference/access.py);
    `feedback`: where /v1/feedback keeps what it is told (default: RUN/feedback); `engine`: the
    batching engine to generate with (default: a new one with `limits`' sizes)."""
    app = FastAPI(title="gptjax", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, keys=tuple(keys), limits=limits)
    if engine is None:
        engine = batching.Engine(bot, limits.max_batch, limits.max_queue, limits.request_timeout)
    feedback = feedback or Feedback(FeedbackOptions(), bot.run_dir, bot.name)
    _add_error_handlers(app)
    _add_info_routes(app, bot, engine)
    _add_generation_routes(app, bot, engine, _Requests(bot, limits), feedback)
    _add_tokenizer_routes(app, bot)
    feedback.add_route(app)
    return app


class _Requests:
    """What every generation request is checked and read with: its settings (seeds counted
    per app), the new tokens it may have, its prompts as token ids."""

    def __init__(self, bot: Chatbot, limits: Limits):
        self.bot, self.limits = bot, limits
        self.most_tokens = limits.max_tokens or bot.context
        self.seeds = itertools.count()

    def settings(self, body: _Request, max_tokens: int) -> Settings:
        """The request's generation settings (its seed, or the next one); RequestError for a
        bad one."""
        seed = body.seed if body.seed is not None else next(self.seeds)
        stops = body.stops(self.limits.max_stops)
        chosen = Settings(max_tokens, body.temperature, body.top_k, body.top_p, seed, stops)
        try:
            chosen.check()
        except ConfigError as error:
            raise RequestError(str(error)) from None
        return chosen

    def room(self, prompt_tokens: int, asked: int | None) -> int:
        """New tokens allowed: as asked, at most to the end of the context; asking for more
        than --max-tokens (default: the context) is an error."""
        if asked is not None and asked > self.most_tokens:
            raise RequestError(
                f"max_tokens: {asked} is over the {self.most_tokens} new tokens this server allows "
                f"(the model's context holds {self.bot.context})",
                "max_tokens",
            )
        try:
            check_context(prompt_tokens, self.bot.context)
        except ContextError as error:
            raise RequestError(str(error), "messages", "context_length_exceeded") from None
        left = self.bot.context - prompt_tokens
        return min(asked or left, left)

    def prompt_ids(self, prompt) -> tuple[list[list[int]], list[str]]:
        """(token ids, text as echoed) of each prompt of a request."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if not prompt or len(prompt) > self.limits.max_prompts:
            raise RequestError(f"prompt: give 1 to {self.limits.max_prompts} prompts", "prompt")
        ids, texts = [], []
        vocab = self.bot.tokenizer.vocab_size
        for p in prompt:
            if isinstance(p, str):
                ids.append(generate.encode_prompts(self.bot.tokenizer, [p])[0])
                texts.append(p)
                continue
            if not p or any(not 0 <= i < vocab for i in p):
                raise RequestError(
                    f"prompt: a token-id prompt needs 1 or more ids in 0..{vocab - 1}", "prompt"
                )
            ids.append(list(p))
            texts.append(self.bot.tokenizer.decode(p))
        return ids, texts


def _add_error_handlers(app: FastAPI) -> None:
    """Every mistake as OpenAI's JSON error (4xx), a failure as a 500."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(400, *_explain(error))

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return _error(400, str(error), error.param, error.code)

    @app.exception_handler(batching.QueueFull)
    async def busy(request: Request, error: batching.QueueFull):
        answer = _error(503, str(error), code="server_busy")
        answer.headers["Retry-After"] = str(error.retry_after)
        return answer

    @app.exception_handler(batching.RequestTimeout)
    async def late(request: Request, error: batching.RequestTimeout):
        return _error(504, str(error), code="request_timeout")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):
        return _error(500, f"generation failed: {type(error).__name__}: {error}")


def _add_info_routes(app: FastAPI, bot: Chatbot, engine: batching.Engine) -> None:
    """/health, /metrics and /v1/models."""

    @app.get("/health")
    async def health():
        name, context = bot.name, bot.context
        rows = {"queued": engine.queued(), "running": engine.running(), "max_batch": engine.rows}
        return {"status": "ok", "model": name, "context": context, **rows}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(engine.metrics()), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        entry = {"id": bot.name, "object": "model", "created": 0, "owned_by": "gptjax"}
        return {"object": "list", "data": [entry]}


def _add_generation_routes(
    app: FastAPI, bot: Chatbot, engine: batching.Engine, requests: _Requests, feedback: Feedback
):
    """/v1/chat/completions and /v1/completions (generated, or scored by `Completions`); the
    generated replies are remembered for /v1/feedback."""

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            messages = chat.check(messages, "messages")
        except DataError as error:
            raise RequestError(str(error), "messages") from None
        ids = bot.prompt_ids(messages)  # encoded once per request
        prompt_tokens = len(ids)
        asked = body.max_completion_tokens or body.max_tokens
        chosen = requests.settings(body, requests.room(prompt_tokens, asked))
        stops = bot.stopping(chosen, reply=True)
        pieces = engine.submit(ids, chosen, *stops, route="chat")
        reply = Reply("chat.completion", "chatcmpl", bot.name, prompt_tokens)
        pieces = feedback.track(pieces, reply.id, messages=messages)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(reply.chat_chunks(pieces, usage))
        return await reply.chat_response(pieces)

    scoring = Completions(bot)

    async def scored_completions(body: CompletionRequest) -> dict:
        if body.stream:
            raise RequestError(
                "stream: not with logprobs, max_tokens 0, token ids or several prompts", "stream"
            )
        prompts, texts = requests.prompt_ids(body.prompt)
        if body.max_tokens:
            chosen = requests.settings(
                body, min(requests.room(len(ids), body.max_tokens) for ids in prompts)
            )
        else:  # nothing new: the prompt alone may fill the context
            try:
                check_context(max(len(ids) for ids in prompts), bot.context, new=0)
            except ContextError as error:
                raise RequestError(str(error), "prompt", "context_length_exceeded") from None
            chosen = None

        def job():
            yield scoring.answer(prompts, texts, chosen, body.echo, body.logprobs)

        answers = [answer async for answer in engine.exclusive(job)]
        choices, completion_tokens = answers[0]
        reply = Reply("text_completion", "cmpl", bot.name, sum(map(len, prompts)))
        reply.completion_tokens = completion_tokens
        return {**reply._head(reply.kind), "choices": choices, "usage": reply.usage()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if body.scored():
            return await scored_completions(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError("prompt: give one prompt (a string or a list of one)", "prompt")
            prompt = prompt[0]
        ids = bot.prompt_ids(prompt=prompt)  # encoded once per request
        prompt_tokens = len(ids)
        chosen = requests.settings(body, requests.room(prompt_tokens, body.max_tokens))
        stops = bot.stopping(chosen, reply=False)
        pieces = engine.submit(ids, chosen, *stops, route="completions")
        reply = Reply("text_completion", "cmpl", bot.name, prompt_tokens)
        pieces = feedback.track(pieces, reply.id, prompt=prompt)
        echo = prompt if body.echo else ""
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(reply.text_chunks(pieces, echo, usage))
        return await reply.text_response(pieces, echo)


def _add_tokenizer_routes(app: FastAPI, bot: Chatbot) -> None:
    """vLLM's tokenizer endpoints (lm-eval's remote tokenizer)."""

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "eos_token": EOS_TEXT,
            "bos_token": None,
            "pad_token": None,
            "model_max_length": bot.context,
            "vocab_size": bot.tokenizer.vocab_size,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.prompt == EOS_TEXT:
            ids = [bot.tokenizer.eod_id]
        else:
            ids = bot.tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": bot.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": bot.tokenizer.decode(body.tokens)}


class _Stream(StreamingResponse):
    """A streamed response that listens for the client's disconnect while it streams
    (whatever the ASGI version; Starlette's own notices it only at the next send): a client that
    goes away ends its generation, and frees its batch row, at once."""

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:

            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while a piece was sent
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as error:  # noqa: BLE001 - the headers are sent: an error event ends it
            timeout = isinstance(error, batching.RequestTimeout)
            message = str(error) if timeout else f"generation failed: {type(error).__name__}"
            body = {"message": message, "type": "server_error", "param": None}
            body["code"] = "request_timeout" if timeout else None
            yield f"data: {json.dumps({'error': body})}\n\n"
            return
        yield "data: [DONE]\n\n"

    return _Stream(lines(), media_type="text/event-stream")


class Reply:
    """One response in OpenAI's shapes (whole, or as stream chunks)."""

    def __init__(self, kind: str, prefix: str, model: str, prompt_tokens: int):
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt, done = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def _collect(self, pieces) -> tuple[str, str]:
        text, finish = "", "length"
        async for piece in pieces:
            text += piece.text
            self.completion_tokens += piece.tokens
            finish = piece.finish or finish
        return text, finish

    async def chat_response(self, pieces) -> dict:
        text, finish = await self._collect(pieces)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**self._head(self.kind), "choices": [choice], "usage": self.usage()}

    async def text_response(self, pieces, echo: str) -> dict:
        text, finish = await self._collect(pieces)
        choice = {"index": 0, "text": echo + text, "finish_reason": finish, "logprobs": None}
        return {**self._head(self.kind), "choices": [choice], "usage": self.usage()}

    async def chat_chunks(self, pieces, usage: bool) -> AsyncIterator[dict]:
        head = self._head("chat.completion.chunk")
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**head, "choices": [first]}
        async for piece in pieces:
            self.completion_tokens += piece.tokens
            delta = {"content": piece.text} if piece.text else {}
            if delta or piece.finish:
                choice = {"index": 0, "delta": delta, "finish_reason": piece.finish}
                yield {**head, "choices": [choice]}
        if usage:
            yield {**head, "choices": [], "usage": self.usage()}

    async def text_chunks(self, pieces, echo: str, usage: bool) -> AsyncIterator[dict]:
        head = self._head(self.kind)
        if echo:
            yield {**head, "choices": [{"index": 0, "text": echo, "finish_reason": None}]}
        async for piece in pieces:
            self.completion_tokens += piece.tokens
            if piece.text or piece.finish:
                choice = {"index": 0, "text": piece.text, "finish_reason": piece.finish}
                yield {**head, "choices": [choice]}
        if usage:
            yield {**head, "choices": [], "usage": self.usage()}


# --- the command --------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free port); one-line ServeError when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(
    run_dir,
    host="127.0.0.1",
    port=8000,
    step=None,
    chunk=TOKENS_PER_CALL,
    devices=None,
    mesh=None,
    keys: Iterable[str] = (),
    allow_unauthenticated: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    quant: str | None = None,
    feedback: FeedbackOptions | None = None,
) -> int:
    keys = tuple(keys)
    limits.check()
    warning = exposure(host, keys, allow_unauthenticated)  # before binding or loading anything
    name = Path(run_dir).resolve().name
    kept = Feedback(feedback or FeedbackOptions(), run_dir, name)  # its files read back first
    sock = listen(host, port)  # before loading: a taken port fails at once
    bot = Chatbot(run_dir, step, chunk, devices, mesh, quant)
    engine = batching.Engine(
        bot, limits.max_batch, limits.max_queue, limits.request_timeout, start=False
    )
    engine.warm(bot.prompt_ids([{"role": "user", "content": "hi"}]))  # compile before serving
    engine.start()
    bound = sock.getsockname()[1]
    if warning:
        print(warning, file=sys.stderr, flush=True)
    guarded = f"an API key required ({len(keys)} accepted)" if keys else "no API key"
    print(
        f"gptjax: serving {bot.name} on http://{host}:{bound}/v1, {guarded}, "
        f"{engine.rows} requests at a time (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    app = make_app(bot, keys, limits, kept, engine)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=limits.keep_alive)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
