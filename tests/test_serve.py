"""Talking to a run: the chat model (history fitting, replies that stop at the end of turn), the
OpenAI-compatible server driven by the official `openai` client, and `gptjax chat` in a
pseudo-terminal. The oracle for every reply is the same greedy generation run in this process."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, served, served_process

from gptjax.data import prefs
from gptjax.inference import access, feedback, generate, serve
from gptjax.inference.chatbot import Chatbot, ContextError, Settings

openai = pytest.importorskip("openai")
pexpect = pytest.importorskip("pexpect")

GREEDY = Settings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def run_dir(chat_run):
    """A tiny run (its tokenizer reserves the role pieces, so it renders chats natively)."""
    return chat_run


@pytest.fixture(scope="module")
def bot(run_dir):
    return Chatbot(run_dir)


def reply_text(bot, messages, settings=GREEDY):
    return "".join(piece.text for piece in bot.reply(messages, settings))


def test_replies_stop_at_the_end_of_turn_and_equal_the_plain_generation(bot):
    """The reply is the greedy continuation of the rendered prompt, cut at the first <|end|>
    or end-of-document token (the generator's stop ids)."""
    messages = [{"role": "user", "content": "def main():"}]
    ids = bot.template.prompt(messages)
    assert ids[-1] == bot.tokenizer.piece_id("<|assistant|>")
    pieces = list(generate.generate(bot.setup, bot.params, bot.tokenizer, [ids], 40, 0.0))
    tokens = [t for p in pieces for t in p.ids]
    stops = {bot.template.end_id, bot.tokenizer.eod_id}
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    settings = Settings(max_new_tokens=40, temperature=0.0)
    got = list(bot.reply(messages, settings))
    assert "".join(p.text for p in got) == bot.tokenizer.decode(tokens[:cut])
    assert sum(p.tokens for p in got) == cut
    assert got[-1].finish == ("length" if cut == len(tokens) else "stop")


def test_history_keeps_the_newest_turns_that_fit(bot):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(12):
        turns += [
            {"role": "user", "content": f"question {i}: what does import do?"},
            {"role": "assistant", "content": f"answer {i}: it loads a module."},
        ]
    asked = [system, *turns, {"role": "user", "content": "and from?"}]
    fitted = bot.fit(asked, max_new_tokens=200)
    limit = bot.context - bot.reply_room(200)
    assert fitted[0] == system and fitted[-1] == asked[-1]
    assert fitted[1]["role"] == "user" and len(fitted) < len(asked)
    assert fitted == [system, *asked[len(asked) - len(fitted) + 1 :]]  # a suffix of the turns
    assert len(bot.template.prompt(fitted)) <= limit
    one_more = [system, *asked[len(asked) - len(fitted) - 1 :]]  # the previous exchange too
    assert len(bot.template.prompt(one_more)) > limit
    with pytest.raises(ContextError, match="the context holds 64"):
        bot.fit([{"role": "user", "content": "word " * 200}], max_new_tokens=10)


# --- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run_dir):
    """`gptjax serve RUN_DIR --port 0` in a subprocess; yields its base URL."""
    with served(run_dir) as url:
        yield url


def request(url, body: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (or a POST of `body` as JSON) with the standard library."""
    data = None if body is None else body.encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_gets_a_completion_and_a_streamed_chat_completion(server, bot):
    done = client(server).completions.create(
        model="tiny", prompt="import os\n", max_tokens=8, temperature=0
    )
    pieces = list(
        generate.generate(
            bot.setup, bot.params, bot.tokenizer, ["import os\n"], max_new_tokens=8, temperature=0
        )
    )
    assert done.choices[0].text == "".join(p.text for p in pieces)
    assert done.usage.prompt_tokens == len(bot.tokenizer.encode("import os\n"))
    assert done.choices[0].finish_reason == pieces[-1].finish.reply  # the generator's reason

    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "open a file"},
    ]
    stream = client(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    replied = list(bot.reply(messages, GREEDY))  # max_new_tokens 12, as asked
    assert text == "".join(piece.text for piece in replied)
    assert chunks[-1].choices[0].finish_reason == replied[-1].finish  # the chat model's reason
    assert all(c.id == chunks[0].id for c in chunks)


healthy = {
    "status": "ok",
    "model": "chatrun0",
    "context": 64,
    "queued": 0,
    "running": 0,
    "max_batch": 8,
}


@pytest.mark.parametrize(
    "path, body, status, where",
    [
        ("/v1/chat/completions", "{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "m"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            400,
            "system message may only come first",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 100}]}, 400, ""),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),  # 0: echo
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_malformed_requests_get_a_4xx_json_error(server, path, body, status, where):
    content = body if isinstance(body, str) else json.dumps(body)
    got, answer = request(server + path, content)
    assert got == status
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and where in error["message"]
    if "x x" in content:
        assert error["code"] == "context_length_exceeded"
    assert request(server + "/health") == (200, healthy)  # still serving


def test_the_openai_client_raises_bad_request_for_an_unknown_role(server):
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "wizard", "content": "hi"}]
        )


def test_eight_concurrent_requests_are_all_answered(server, bot):
    prompts = [f"write function number {i}" for i in range(8)]

    def ask(i):
        messages = [{"role": "user", "content": prompts[i]}]
        common = dict(model="tiny", messages=messages, max_tokens=6, temperature=0)
        if i % 2:
            stream = client(server).chat.completions.create(**common, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client(server).chat.completions.create(**common).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    settings = Settings(max_new_tokens=6, temperature=0.0)
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == reply_text(bot, [{"role": "user", "content": prompt}], settings)
    assert request(server + "/health")[1]["queued"] == 0


def test_a_taken_port_is_one_clear_error(server):
    port = server.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "gptjax", "serve", "nowhere", "--port", port],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"gptjax: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


# --- access and limits (gptjax/inference/access.py) ----------------------------------------------

KEYS = ("first-key-0123", "second-key-4567")
LIMITS = access.Limits(max_body_bytes=4096, max_prompts=2, max_stops=2, body_timeout=1.0)


@contextlib.contextmanager
def in_process(app):
    """`app` served by uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(600):  # until it answers (no timing is asserted)
        try:
            request(url + "/health")
            break
        except OSError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def guarded(bot):
    """The app with two keys and small limits, served in this process (the `bot` fixture's
    model: nothing more to load or compile); yields its base URL."""
    with in_process(serve.make_app(bot, KEYS, LIMITS)) as url:
        yield url


def call(url, body=None, key=None, method=None, headers=()) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a request with an optional bearer key."""
    data = None if body is None else (body if isinstance(body, bytes) else body.encode())
    req = urllib.request.Request(url, data, {"content-type": "application/json", **dict(headers)})
    if method:
        req.method = method
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


ROUTES = [
    ("/v1/models", None),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1})),
    ("/v1/nothing", "{}"),
    ("/tokenizer_info", None),
    ("/tokenize", json.dumps({"prompt": "x"})),
    ("/detokenize", json.dumps({"tokens": [5]})),
]


def good_completion(url, key=KEYS[0]):
    body = json.dumps({"prompt": "import os\n", "max_tokens": 3, "temperature": 0})
    status, answer, _ = call(url + "/v1/completions", body, key)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    return answer["choices"][0]["text"]


def test_every_route_but_health_needs_a_key(guarded, bot):
    wrong = [None, "", "nope", KEYS[0] + "x", KEYS[0][:-1], f"{KEYS[0]} {KEYS[1]}"]
    for path, body in ROUTES:
        for key in wrong:
            status, answer, headers = call(guarded + path, body, key)
            assert status == 401, (path, key)
            error = answer["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert set(error) == {"message", "type", "param", "code"}
            assert headers["www-authenticate"] == "Bearer"
            text = json.dumps(answer)
            assert not any(k in text for k in KEYS) and (not key or key not in text)
        # another scheme with a right key is refused too
        assert call(guarded + path, body, headers={"Authorization": f"Basic {KEYS[0]}"})[0] == 401
    status, answer, _ = call(guarded + "/health")
    assert status == 200 and answer["status"] == "ok"
    for key in KEYS:  # either key is accepted
        assert call(guarded + "/v1/models", key=key)[0] == 200
    assert call(guarded + "/v1/nothing", "{}", KEYS[1])[0] == 404


def test_the_openai_client_with_the_key_gets_a_completion_and_a_streamed_chat(guarded, bot):
    keyed = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEYS[1], max_retries=0, timeout=300)
    done = keyed.completions.create(model="t", prompt="import os\n", max_tokens=8, temperature=0)
    expected = generate.complete(
        bot.setup, bot.params, bot.tokenizer, ["import os\n"], max_new_tokens=8, temperature=0
    )[0]
    assert done.choices[0].text == expected
    messages = [{"role": "user", "content": "open a file"}]
    stream = keyed.chat.completions.create(
        model="t", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply_text(bot, messages)
    unkeyed = openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0, timeout=300)
    with pytest.raises(openai.AuthenticationError):
        unkeyed.models.list()


def raw_post(url, head: dict, parts: list[bytes], wait_for_answer=True) -> tuple[int, dict]:
    """POST with exactly these headers and body parts (http.client: chunked when no length)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        chunked = "Content-Length" not in head
        conn.putrequest("POST", "/v1/completions")
        sent = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json", **head}
        for name, value in sent.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for part in parts:
            conn.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(guarded):
    before = good_completion(guarded)
    over = json.dumps({"prompt": "x" * 5000, "max_tokens": 1})
    status, answer, _ = call(guarded + "/v1/completions", over, KEYS[0])
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    # refused from the Content-Length alone: the body is never sent, the answer still comes
    status, answer = raw_post(guarded, {"Content-Length": str(10**9)}, [])
    assert status == 413 and "4096 bytes" in answer["error"]["message"]
    # no Content-Length: counted as it streams in
    status, answer = raw_post(guarded, {}, [b"{" + b" " * 1000] * 5 + [b"}"])
    assert status == 413
    status, answer = raw_post(guarded, {}, [b'{"prompt": "x",', b' "max_tokens": 1}'])
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert good_completion(guarded) == before


def test_a_body_that_never_finishes_is_408(guarded):
    status, answer = raw_post(guarded, {"Content-Length": "100"}, [b'{"prompt": '])
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    good_completion(guarded)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": [[5], [6], [7]], "max_tokens": 0}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 3},
            "stop",
        ),
        ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 65},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99},
            "max_tokens",
        ),
    ],
)
def test_requests_over_a_limit_are_400_and_the_server_keeps_serving(guarded, path, body, param):
    status, answer, _ = call(guarded + path, json.dumps(body), KEYS[0])
    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    good_completion(guarded)


def test_at_the_limits_is_answered(guarded):
    """Two stops; max_tokens = the whole context, cut to what the prompt leaves ("length")."""
    body = {"prompt": "import os\n", "max_tokens": 64, "stop": ["<x>", "<y>"], "temperature": 0}
    status, answer, _ = call(guarded + "/v1/completions", json.dumps(body), KEYS[0])
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert status == 200 and 0 < answer["usage"]["completion_tokens"] <= 64 - prompt_tokens


def test_keys_come_from_the_flag_the_environment_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# the team\nalpha\n\n  beta  \nalpha\n")
    environ = {access.KEY_ENV: "gamma"}
    assert access.load_keys("delta", keys, environ) == ("delta", "gamma", "alpha", "beta")
    assert access.load_keys(None, None, {}) == ()
    (tmp_path / "empty").write_text("# nothing\n\n")
    for args, match in [
        ((None, tmp_path / "empty", {}), "holds no key"),
        ((None, tmp_path / "missing", {}), "cannot read --api-key-file"),
        (("", None, {}), "an empty API key"),
        ((None, None, {access.KEY_ENV: " "}), "an empty API key"),
        (("two words", None, {}), "may not contain spaces"),
    ]:
        with pytest.raises(access.AccessError, match=match):
            access.load_keys(*args)
    assert access.authorized(f"Bearer {KEYS[1]}", tuple(map(access.digest, KEYS)))
    assert not access.authorized(f"Bearer {KEYS[1]}x", tuple(map(access.digest, KEYS)))
    assert not access.authorized(f"Bearer {KEYS[1]}", ())


def test_a_public_host_without_a_key_is_refused_unless_allowed():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert access.exposure(host, (), False) is None
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "example.org"):
        assert access.exposure(host, ("k",), False) is None
        with pytest.raises(access.AccessError, match="--allow-unauthenticated"):
            access.exposure(host, (), False)
        warning = access.exposure(host, (), True)
        assert warning.startswith("gptjax: warning: no API key on") and "\n" not in warning
        assert "serving" not in warning  # the start line, which scripts wait for, comes after
    # the command refuses before loading the run or binding the port
    env = {k: v for k, v in os.environ.items() if k != access.KEY_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "gptjax", "serve", "no-such-run", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gptjax: error: --host 0.0.0.0 lets other machines use")
    assert result.stderr.count("\n") == 1


# --- feedback: served replies -> preference pairs (gptjax/inference/feedback.py) ----------------

QUESTION = [{"role": "user", "content": "open a file"}]


@contextlib.contextmanager
def feedback_server(bot, directory, **options):
    """The app with KEYS (default limits) and its feedback in `directory`; yields the URL."""
    kept = feedback.Feedback(feedback.FeedbackOptions(directory, **options), bot.run_dir, "t")
    with in_process(serve.make_app(bot, KEYS, feedback=kept)) as url:
        yield url


def chat_reply(url, key=KEYS[0], **settings) -> tuple[str, str]:
    """(id, reply) of a chat completion of QUESTION."""
    body = {"messages": QUESTION, "max_tokens": 3, "temperature": 0, **settings}
    status, answer, _ = call(url + "/v1/chat/completions", json.dumps(body), key)
    assert status == 200
    return answer["id"], answer["choices"][0]["message"]["content"]


def post_feedback(url, body, key=KEYS[0]) -> tuple[int, dict]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    status, answer, _ = call(url + "/v1/feedback", data, key)
    return status, answer


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_32_concurrent_feedback_posts_all_land_exactly_once(bot, tmp_path):
    with feedback_server(bot, tmp_path) as url:
        served = [chat_reply(url) for _ in range(32)]
        bodies = [{"id": id_, "preferred": f"better {i}"} for i, (id_, _) in enumerate(served)]
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda body: post_feedback(url, body), bodies))
    assert all(status == 200 and answer["pairs"] == 1 for status, answer in answers), answers
    pairs = lines(tmp_path / "prefs.jsonl")
    assert sorted(p["chosen"] for p in pairs) == sorted(b["preferred"] for b in bodies)
    by_chosen = {p["chosen"]: p for p in pairs}
    for (id_, reply), body in zip(served, bodies, strict=True):
        pair = by_chosen[body["preferred"]]
        assert pair["messages"] == QUESTION and pair["rejected"] == reply
        assert pair["rejected_id"] == id_ and pair["source"] == "feedback:preferred"
    read = prefs.read(str(tmp_path / "prefs.jsonl"))  # what `data.source=prefs:` takes
    assert sorted(p.chosen for p in read) == sorted(b["preferred"] for b in bodies)


def test_ratings_pair_each_good_reply_with_each_bad_one_once(bot, tmp_path):
    with feedback_server(bot, tmp_path) as url:
        replies = {}  # four different replies to the same question (seeds found in order)
        for seed in range(100):
            id_, reply = chat_reply(url, temperature=1.0, seed=seed)
            if reply not in replies.values():
                replies[id_] = reply
            if len(replies) == 4:
                break
        (g1, g2, b1, b2) = replies
        got = [
            post_feedback(url, {"id": i, "rating": r})
            for i, r in [(g1, "good"), (g2, 1), (b1, "bad"), (b2, -1)]
        ]
        assert [(s, a["pairs"]) for s, a in got] == [(200, 0), (200, 0), (200, 2), (200, 2)]
        assert post_feedback(url, {"id": b2, "rating": "bad"})[1]["pairs"] == 0  # a retry
        status, answer = post_feedback(url, {"id": g1, "rating": "bad"})
        assert status == 409 and answer["error"]["code"] == "already_rated"
    pairs = lines(tmp_path / "prefs.jsonl")
    expected = {(replies[g], replies[b]) for g in (g1, g2) for b in (b1, b2)}
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == sorted(expected)
    assert all(p["messages"] == QUESTION for p in pairs)
    read = prefs.read(str(tmp_path / "prefs.jsonl"))
    assert sorted((p.chosen, p.rejected) for p in read) == sorted(expected)
    ratings = lines(tmp_path / "ratings" / "ratings.jsonl")
    assert [(r["id"], r["rating"], r["reply"]) for r in ratings] == [
        (g1, 1, replies[g1]),
        (g2, 1, replies[g2]),
        (b1, -1, replies[b1]),
        (b2, -1, replies[b2]),
    ]
    # read back after a restart: the pairs are known (none again), the ratings still pair
    store = feedback.Store(tmp_path, 10**6)
    again = feedback.Served(g1, feedback.CHAT, {"messages": QUESTION}, replies[g1])
    assert store.rate(again, 1) == [] and len(lines(tmp_path / "prefs.jsonl")) == 4
    other = feedback.Served("x-1", feedback.CHAT, {"messages": QUESTION}, "a new reply")
    assert {p["rejected"] for p in store.rate(other, 1)} == {replies[b1], replies[b2]}
    # the cap: feedback that would pass it is refused whole, nothing of it written
    size = store.size
    full = feedback.Store(tmp_path, size + 10)
    with pytest.raises(feedback.Refused, match="full") as refused:
        full.prefer(again, "a long preferred reply")
    assert refused.value.status == 413 and full.size == size
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.jsonl")) == size


def test_malformed_feedback_is_4xx_json_and_the_server_keeps_serving(bot, tmp_path):
    with feedback_server(bot, tmp_path) as url:
        id_, reply = chat_reply(url)
        cases = [
            (b"{not json", 400, None),
            ("[1, 2]", 400, None),
            ({"rating": "good"}, 400, "id"),
            ({"id": 7, "rating": "good"}, 400, "id"),
            ({"id": id_}, 400, None),
            ({"id": id_, "rating": "good", "preferred": "x"}, 400, None),
            ({"id": "chatcmpl-" + "0" * 32, "rating": "good"}, 404, "id"),
            ({"id": id_, "rating": "meh"}, 400, "rating"),
            ({"id": id_, "rating": True}, 400, "rating"),
            ({"id": id_, "rating": [1]}, 400, "rating"),
            ({"id": id_, "preferred": ""}, 400, "preferred"),
            ({"id": id_, "preferred": reply}, 400, None),
            ({"id": id_, "preferred": "ok <|end|>"}, 400, "preferred"),
            ({"id": id_, "preferred": "x" * 70_000}, 413, None),
        ]
        for body, status, param in cases:
            got, answer = post_feedback(url, body)
            assert got == status, (body, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            assert answer["error"]["param"] == param and answer["error"]["type"] == (
                "invalid_request_error"
            )
            good_completion(url)
        for key in (None, "wrong"):  # behind the key like every /v1 route
            got, answer = post_feedback(url, {"id": id_, "rating": "good"}, key)
            assert got == 401 and answer["error"]["code"] == "invalid_api_key"
        assert not (tmp_path / "prefs.jsonl").exists()  # nothing written by any of them
        # a streamed chat reply and a plain completion are remembered too
        body = {"messages": QUESTION, "max_tokens": 3, "temperature": 0, "stream": True}
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[1], max_retries=0, timeout=300)
        chunks = list(keyed.chat.completions.create(model="t", **body))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert post_feedback(url, {"id": chunks[0].id, "preferred": "yes!"})[0] == 200
        done = keyed.completions.create(model="t", prompt="import os\n", max_tokens=3)
        assert post_feedback(url, {"id": done.id, "preferred": "import sys"})[0] == 200
    (pair,) = lines(tmp_path / "prefs.jsonl")
    assert (pair["messages"], pair["chosen"], pair["rejected"]) == (QUESTION, "yes!", streamed)
    (pair,) = lines(tmp_path / "completions" / "prefs.jsonl")
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (
        "import os\n",
        "import sys",
        done.choices[0].text,
    )


def test_kill_9_right_after_acknowledgements_loses_none(run_dir, tmp_path):
    with served_process(run_dir, args=["--feedback-dir", str(tmp_path)]) as (url, process):
        served = [chat_reply(url, key=None) for _ in range(8)]
        for i, (id_, _) in enumerate(served):
            assert post_feedback(url, {"id": id_, "preferred": f"better {i}"}, None)[0] == 200
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    pairs = lines(tmp_path / "prefs.jsonl")
    assert [(p["rejected_id"], p["chosen"]) for p in pairs] == [
        (id_, f"better {i}") for i, (id_, _) in enumerate(served)
    ]
    # a line torn by a crash (never acknowledged) is cut off when the files are opened again
    whole = (tmp_path / "prefs.jsonl").read_bytes()
    with open(tmp_path / "prefs.jsonl", "ab") as file:
        file.write(b'{"messages": [{"role": "us')
    store = feedback.Store(tmp_path, 10**6)
    assert (tmp_path / "prefs.jsonl").read_bytes() == whole and store.size == len(whole)
    assert len(store.pairs) == 8


def test_a_failed_feedback_write_keeps_nothing_of_it(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) is a 500 and leaves the file as it was."""
    store = feedback.Store(tmp_path, 10**6)
    served = feedback.Served("cmpl-1", feedback.COMPLETION, {"prompt": "p"}, "r")
    store.prefer(served, "first")
    before = (tmp_path / "completions" / "prefs.jsonl").read_bytes()
    write = os.write

    def half(fd, data):
        write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback.os, "write", half)
    with pytest.raises(feedback.Refused, match="No space left") as refused:
        store.prefer(served, "second")
    assert refused.value.status == 500
    assert (tmp_path / "completions" / "prefs.jsonl").read_bytes() == before
    monkeypatch.setattr(feedback.os, "write", write)
    assert len(store.prefer(served, "second")) == 1
    assert [p["chosen"] for p in lines(tmp_path / "completions" / "prefs.jsonl")] == [
        "first",
        "second",
    ]


# --- the terminal -------------------------------------------------------------------------------


# pexpect forks this (JAX-threaded) process only to exec the chat at once: nothing can deadlock
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_chat_in_a_pseudo_terminal_answers_and_exits_on_ctrl_d(run_dir, bot):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gptjax", "chat", str(run_dir), "--max-new-tokens", "12", "--temperature", "0"],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        encoding="utf-8",
        timeout=300,
        dimensions=(24, 200),
    )
    try:
        child.expect_exact("you> ")
        assert "64-token context" in child.before

        def say(line):
            child.sendline(line)
            child.expect_exact("bot> ")
            child.expect_exact("you> ")
            return child.before.replace("\r\n", "\n").removesuffix("\n")

        first = {"role": "user", "content": "print hello"}
        answer = say("print hello")
        expected = reply_text(bot, [first])
        assert answer == expected and expected.strip()
        # the history goes into the next prompt
        second = {"role": "user", "content": "again"}
        history = [first, {"role": "assistant", "content": expected}, second]
        assert say("again") == reply_text(bot, history, Settings(12, 0.0, seed=1))

        child.sendline("/system You write Python.")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("you> ")
        with_system = [{"role": "system", "content": "You write Python."}, first]
        assert say("print hello") == reply_text(bot, with_system, Settings(12, 0.0, seed=2))

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
