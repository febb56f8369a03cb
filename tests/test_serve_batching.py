"""Continuous batching in `gptjax serve` (gptjax/inference/batching.py): concurrent requests
each get exactly their answer alone; a dropped stream frees its row at once; a full queue is 503
with Retry-After; a request past its timeout is 504; /health and /metrics report the engine.

One server per module (the app in a uvicorn thread of this process, 4 rows, 12 waiting at most).
Where a test must hold requests in place, it holds the engine's turns with its `gate` (one
permit a turn) and watches /health and /metrics: nothing depends on timing."""

import asyncio
import json
import re
import threading
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from conftest import tiny_config

from gptjax.core import model, steps
from gptjax.inference import access, batching, serve
from gptjax.inference.chatbot import Chatbot
from gptjax.inference.settings import Settings

openai = pytest.importorskip("openai")

ROWS, QUEUE = 4, 12


@pytest.fixture(scope="module")
def bot(chat_run):
    return Chatbot(chat_run)


@pytest.fixture(scope="module")
def server(bot):
    """(base URL, engine) of the app served by uvicorn in a thread of this process."""
    import uvicorn

    limits = access.Limits(max_batch=ROWS, max_queue=QUEUE)
    engine = batching.Engine(bot, ROWS, QUEUE, limits.request_timeout)
    sock = serve.listen("127.0.0.1", 0)
    app = serve.make_app(bot, (), limits, engine=engine)
    config = uvicorn.Config(app, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_until(lambda: health(url))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=30)


def wait_until(check, what="the server"):
    """Poll `check` until it is truthy (a hang fails the test; no timing is asserted)."""
    for _ in range(3000):
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{what} never got there")


def http(url, body=None) -> tuple[int, dict | str, dict]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    req = urllib.request.Request(
        url, None if data is None else data.encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            text = response.read().decode()
            kind = response.headers.get("content-type", "")
            answer = json.loads(text) if "json" in kind else text
            return response.status, answer, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


def health(url) -> dict:
    status, answer, _ = http(url + "/health")
    assert status == 200 and answer["status"] == "ok"
    return answer


def metric(url, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent)."""
    status, text, headers = http(url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if line.startswith("#") or not found:
            continue
        have = ",".join(sorted((found.group(2) or "").split(","))) if found.group(2) else ""
        if found.group(1) == name and have == want:
            return float(found.group(3))
    return 0.0


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


# 16 requests: chat and completions, streamed and whole, greedy and seeded sampling (top-k,
# top-p), prompts and token limits of different lengths, stop strings
def request_of(i: int) -> dict:
    words = ["import os", "def f(x):", "x = 1", "class A:"][i % 4]
    body = {
        "model": "tiny",
        "max_tokens": [5, 30, 17, 44][i % 4] - i % 3,
        "temperature": [0.0, 0.9, 1.0, 1.3][(i // 2) % 4],
        "seed": 1000 + i,
        "stream": i % 3 == 0,
    }
    if i % 4 == 1:
        body["extra_body"] = {"top_k": 20}  # not an OpenAI parameter
    if i % 4 == 2:
        body["top_p"] = 0.9
    if i % 5 == 4:
        body["stop"] = ["e", "\n\n"]
    if i % 2:
        body["messages"] = [{"role": "user", "content": f"{words} number {i}"}]
    else:
        body["prompt"] = f"{words}\n" * (1 + i % 3) + str(i)
    return body


def answer_of(url: str, body: dict) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) through the openai client."""
    body = dict(body)
    chat = "messages" in body
    create = client(url).chat.completions.create if chat else client(url).completions.create
    if not body.pop("stream"):
        done = create(**body)
        choice = done.choices[0]
        text = choice.message.content if chat else choice.text
        return text, choice.finish_reason, done.usage.completion_tokens
    text, finish, usage = "", None, None
    for chunk in create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


MALFORMED = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 100}]}),
    ("/v1/completions", "{not json"),
]


def test_sixteen_concurrent_requests_each_get_their_answer_alone(server):
    """Each request alone (one row running), then all 16 at once with malformed requests among
    them (4 rows: 12 wait and join as rows free): every answer is the same, bit for bit, the
    malformed ones are 400 and the server keeps serving."""
    url, engine = server
    bodies = [request_of(i) for i in range(16)]
    firsts = metric(url, "gptjax_time_to_first_token_seconds_count")
    alone = [answer_of(url, body) for body in bodies]
    assert {a[1] for a in alone} == {"stop", "length"}
    tokens_before = metric(url, "gptjax_generated_tokens_total")

    def bad(case):
        status, answer, _ = http(url + case[0], case[1])
        return status, answer["error"]["type"]

    with ThreadPoolExecutor(20) as pool:
        together = [pool.submit(answer_of, url, body) for body in bodies]
        refused = list(pool.map(bad, MALFORMED))
        together = [future.result() for future in together]
    assert together == alone
    assert refused == [(400, "invalid_request_error")] * len(MALFORMED)
    generated = metric(url, "gptjax_generated_tokens_total") - tokens_before
    assert generated == sum(tokens for _, _, tokens in together)
    state = health(url)
    assert (state["queued"], state["running"], state["max_batch"]) == (0, 0, ROWS)
    assert metric(url, "gptjax_requests_total", route="chat", outcome="ok") >= 16
    answered = 2 * sum(tokens > 0 for _, _, tokens in alone)  # those with a first token
    assert metric(url, "gptjax_time_to_first_token_seconds_count") - firsts == answered


def hold(engine) -> threading.Semaphore:
    engine.gate = gate = threading.Semaphore(0)
    return gate


def let_go(engine, gate) -> None:
    engine.gate = None
    gate.release()


def turn(url, gate, calls: float) -> float:
    """Let the engine take one turn (one decode call); returns the new call count."""
    gate.release()
    return wait_until(
        lambda: (n := metric(url, "gptjax_decode_calls_total")) > calls and n, "a decode call"
    )


def test_a_dropped_stream_frees_its_row_for_the_next_request_at_once(server):
    url, engine = server
    gate = hold(engine)
    try:
        calls = metric(url, "gptjax_decode_calls_total")
        cancelled = metric(url, "gptjax_requests_total", route="completions", outcome="cancelled")
        long = {"model": "tiny", "prompt": "import os\n", "max_tokens": 50, "temperature": 0}
        streams = [client(url).completions.create(**long, stream=True) for _ in range(ROWS)]
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(answer_of, url, {**long, "max_tokens": 3, "stream": False})
            wait_until(lambda: health(url)["queued"] == ROWS + 1, "every request queued")
            calls = turn(url, gate, calls)  # ROWS rows join and make their first token
            state = health(url)
            assert (state["running"], state["queued"]) == (ROWS, 1)
            first = next(iter(streams[0]))
            assert first.choices[0].text  # the first token, mid-way through 50
            streams[0].close()  # the client goes away
            wait_until(lambda: health(url)["running"] == ROWS - 1, "the row freed")
            done = metric(url, "gptjax_requests_total", route="completions", outcome="cancelled")
            assert done == cancelled + 1
            turn(url, gate, calls)  # the waiting request takes the row; the others run on
            state = health(url)
            assert (state["running"], state["queued"]) == (ROWS, 0)
            let_go(engine, gate)
            text, finish, tokens = waiting.result()
            assert 1 <= tokens <= 3 and finish in ("stop", "length")
        for stream in streams[1:]:
            assert sum(len(c.choices[0].text) for c in stream if c.choices) > 0
    finally:
        if engine.gate is gate:
            let_go(engine, gate)
    wait_until(lambda: health(url)["running"] == 0, "every row done")


def test_a_full_queue_is_503_with_retry_after_and_then_served(server):
    url, engine = server
    gate = hold(engine)
    body = {"model": "tiny", "prompt": "x = 1\n", "max_tokens": 2, "temperature": 0}
    try:
        with ThreadPoolExecutor(QUEUE) as pool:
            queued = [pool.submit(http, url + "/v1/completions", body) for _ in range(QUEUE)]
            wait_until(lambda: health(url)["queued"] == QUEUE, "a full queue")
            status, answer, headers = http(url + "/v1/completions", body)
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert answer["error"]["code"] == "server_busy"
            assert metric(url, "gptjax_requests_total", route="completions", outcome="queue_full")
            assert metric(url, "gptjax_queue_depth") == QUEUE
            let_go(engine, gate)
            answers = [future.result() for future in queued]
        assert {status for status, _, _ in answers} == {200}
        assert len({answer["choices"][0]["text"] for _, answer, _ in answers}) == 1
    finally:
        if engine.gate is gate:
            let_go(engine, gate)


def test_a_request_past_its_timeout_is_504(server):
    url, engine = server
    gate = hold(engine)
    timeout, engine.timeout = engine.timeout, 0.05
    try:
        body = {"model": "tiny", "prompt": "x = 1\n", "max_tokens": 2}
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(http, url + "/v1/completions", body)
            wait_until(lambda: health(url)["queued"] == 1, "a queued request")
            time.sleep(0.1)  # past its deadline while held in the queue (no timing asserted)
            engine.timeout = timeout
            let_go(engine, gate)
            status, answer, _ = late.result()
        assert status == 504 and answer["error"]["code"] == "request_timeout"
    finally:
        engine.timeout = timeout
        if engine.gate is gate:
            let_go(engine, gate)
    assert health(url)["queued"] == 0


def test_metrics_need_the_key_and_health_does_not(bot):
    app = serve.make_app(bot, ("k-123",), access.Limits(max_batch=2))
    from starlette.testclient import TestClient

    with TestClient(app) as test:
        assert test.get("/metrics").status_code == 401
        got = test.get("/metrics", headers={"Authorization": "Bearer k-123"})
        assert got.status_code == 200 and "# TYPE gptjax_running_rows gauge" in got.text
        assert test.get("/health").json()["max_batch"] == 2


# --- the engine without HTTP: a sliding-window, grouped-query, rotary model ----------------------


class _Ids:
    """A tokenizer whose text shows the ids (one character each)."""

    vocab_size, eod_id = 512, 0

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)


def test_the_engine_batches_a_local_window_model_exactly():
    """Prompts longer than the 8-token window (the ring cache of attention.py, one write slot
    per row), grouped-query heads, rotary positions, sinks: 6 requests on 4 rows equal each
    request alone, greedy and sampled."""
    cfg = tiny_config(
        "/nonexistent", "unused", "model.positions=rope", "model.n_head=4", "model.n_kv_head=2",
        "model.attention_pattern=[local:8,dense]", "model.attention_sinks=true",
    )  # fmt: skip
    setup = steps.build_model(cfg, jax.devices()[:1])
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in model.param_shapes(cfg.model).items():
        *parents, last = name.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        base = 1.0 if last.endswith("_scale") else 0.0
        node[last] = (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    bot = types.SimpleNamespace(setup=setup, params=jax.device_put(params), tokenizer=_Ids())
    engine = batching.Engine(bot, rows=4, chunk=4)
    asks = [
        (rng.integers(1, 512, n).tolist(), Settings(m, t, k, 1.0, seed=s))
        for n, m, t, k, s in [(3, 9, 0.0, 0, 0), (14, 30, 1.0, 0, 1), (9, 4, 0.9, 5, 2),
                              (12, 20, 0.0, 0, 3), (1, 40, 1.2, 0, 4), (16, 12, 1.0, 30, 5)]
    ]  # fmt: skip

    async def ask(ids, settings):
        return "".join([piece.text async for piece in engine.submit(ids, settings)])

    async def both():
        alone = [await ask(*a) for a in asks]
        return alone, await asyncio.gather(*(ask(*a) for a in asks))

    alone, together = asyncio.run(both())
    assert together == alone
    assert all(0 < len(a) <= s.max_new_tokens for a, (_, s) in zip(alone, asks, strict=True))
