"""Feedback on the replies `gptjax serve` gave, kept as preference pairs for `train.objective=dpo`
(docs/chat.md, "Feedback: from served replies to preference pairs").

    POST /v1/feedback  {"id": "chatcmpl-...", "rating": "good"}      (or "bad", 1, -1)
                       {"id": "chatcmpl-...", "preferred": "a better reply"}

`id` is the id of a reply this server gave (/v1/chat/completions, or a generated
/v1/completions: one prompt, not scored), streamed or not, that finished (a stream the client
left is not kept). The server remembers the last --feedback-remember replies (default 4,096) in
memory: what was asked (the messages after the checks, or the prompt) and the reply; an id it
did not give, or has forgotten (older, or from before a restart), is a 404.

A preferred reply makes one pair at once: chosen = the preferred reply, rejected = the served
one. Ratings are kept (ratings/ratings.jsonl) and pair across replies to the same prompt: each
reply rated good pairs with each different reply to the same messages rated bad, so asking the
same thing twice (a temperature above 0 or another seed) and rating one good and one bad gives
a pair. Ratings are read back at start, so replies rated before a restart still pair.

    FEEDBACK/prefs.jsonl                  chat pairs, the format of `data.source=prefs:PATH`
                                          ({"messages", "chosen", "rejected"} and provenance)
    FEEDBACK/completions/prefs.jsonl      pairs on /v1/completions replies: {"prompt", ...}
                                          (no conversation: not a prefs: source)
    FEEDBACK/ratings/ratings.jsonl        every rating: id, rating (+1/-1), what was asked, reply

FEEDBACK is RUN/feedback unless --feedback-dir says otherwise. Train on the file,
`data.source=prefs:FEEDBACK/prefs.jsonl` (a folder source would read the other files too).

Writes are append-only, one `os.write` per line on an O_APPEND descriptor, under a lock (and
`flock`, against a second server on the same directory), and each acknowledged line is on disk
before the 200 (written, then `fsync`; a new file's directory is synced too). A line torn by a
crash (it was never acknowledged) is cut off when the files are next opened. The same feedback
posted twice (a client retrying) writes nothing new: pairs are written once each, a rating once
per id (another rating for a rated id is a 409). The files together are capped at
--feedback-max-bytes (default 64 MiB; 0 turns feedback off): feedback that would pass the cap is
refused (413, "feedback_full") and nothing of it is written. Every mistake is a 4xx JSON error
in OpenAI's shape; the route sits behind the API key like every path but /health.
"""

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gptjax.data import chat
from gptjax.errors import UserError

CHAT, COMPLETION = "chat", "completion"
PAIRS = {CHAT: Path("prefs.jsonl"), COMPLETION: Path("completions/prefs.jsonl")}
RATINGS = Path("ratings/ratings.jsonl")
RATING_NAMES = {"good": 1, "bad": -1, 1: 1, -1: -1}
MAX_ID = 128  # characters: the server's ids are 40


class FeedbackError(UserError):
    """The feedback files cannot be opened as they are (a line that is not JSON, unreadable)."""


@dataclasses.dataclass(frozen=True)
class FeedbackOptions:
    """`gptjax serve`'s feedback flags."""

    directory: Path | None = None  # None: RUN/feedback
    max_bytes: int = 64 * 1024 * 1024  # the files together; 0: no feedback route
    remember: int = 4096  # served replies kept for feedback
    max_body: int = 64 * 1024  # bytes of one feedback request

    def check(self) -> None:
        if self.max_bytes < 0:
            raise FeedbackError("--feedback-max-bytes must be 0 (off) or more")
        if self.remember < 1:
            raise FeedbackError("--feedback-remember must be at least 1")
        if self.max_body < 1:
            raise FeedbackError("the feedback body limit must be at least 1 byte")


class Refused(Exception):
    """A feedback request answered with a 4xx: status, message, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = ""):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code or "invalid_request"


@dataclasses.dataclass(frozen=True)
class Served:
    """One reply this server gave: what was asked ({"messages"} or {"prompt"}) and the reply."""

    id: str
    kind: str  # CHAT or COMPLETION
    asked: dict[str, Any]
    reply: str

    def key(self) -> str:
        """The same question (kind and what was asked): the replies ratings pair across."""
        return _digest([self.kind, self.asked])


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class Memory:
    """The last `size` finished replies, by id (oldest forgotten first)."""

    def __init__(self, size: int):
        self.size = size
        self._served: collections.OrderedDict[str, Served] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, served: Served) -> None:
        with self._lock:
            self._served[served.id] = served
            while len(self._served) > self.size:
                self._served.popitem(last=False)

    def get(self, id_: str) -> Served | None:
        with self._lock:
            return self._served.get(id_)

    def __len__(self) -> int:
        return len(self._served)


class Store:
    """The append-only feedback files of one directory (this module's docstring)."""

    def __init__(self, directory: str | Path, max_bytes: int, model: str = ""):
        self.directory, self.max_bytes, self.model = Path(directory), max_bytes, model
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self.size = 0
        self.ratings: dict[str, int] = {}  # completion id -> +1/-1
        self.rated: dict[str, dict[int, dict[str, str]]] = {}  # question -> rating -> reply->id
        self.pairs: set[str] = set()  # digests of the pairs written
        for name in (*PAIRS.values(), RATINGS):
            self._load(name)

    # --- reading back at start

    def _load(self, name: Path) -> None:
        path = self.directory / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            raise FeedbackError(f"cannot read {path}: {error.strerror or error}") from None
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # torn by a crash before its acknowledgement: never acknowledged
            with open(path, "r+b") as file:
                file.truncate(whole)
                os.fsync(file.fileno())
        self.size += whole
        for number, line in enumerate(data[:whole].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                if name == RATINGS:
                    self._note_rating(record)
                else:
                    self.pairs.add(self._pair_digest(record))
            except (ValueError, KeyError, TypeError) as error:
                raise FeedbackError(
                    f"{path}:{number}: not a feedback line ({error}); move the file away or fix it"
                ) from None

    @staticmethod
    def _pair_digest(record: dict) -> str:
        asked = {"messages": record["messages"]} if "messages" in record else {}
        if not asked:
            asked = {"prompt": record["prompt"]}
        return _digest([asked, record["chosen"], record["rejected"]])

    def _note_rating(self, record: dict) -> None:
        served = Served(record["id"], record["kind"], record["asked"], record["reply"])
        rating = RATING_NAMES[record["rating"]]
        self.ratings[served.id] = rating
        replies = self.rated.setdefault(served.key(), {1: {}, -1: {}})[rating]
        replies.setdefault(served.reply, served.id)

    # --- feedback

    def rate(self, served: Served, rating: int) -> list[dict]:
        """Record `rating` of `served` and write the pairs it makes; the pairs written."""
        with self._lock:
            earlier = self.ratings.get(served.id)
            if earlier is not None and earlier != rating:
                raise Refused(
                    409,
                    f"{served.id} is already rated {earlier:+d}: a rating is kept once per reply",
                    "rating",
                    "already_rated",
                )
            others = self.rated.get(served.key(), {1: {}, -1: {}})[-rating]
            pairs = []
            for reply, other_id in others.items():
                if reply == served.reply:
                    continue  # the same text rated both ways: no preference in it
                if rating > 0:
                    chosen, rejected = (served.reply, served.id), (reply, other_id)
                else:
                    chosen, rejected = (reply, other_id), (served.reply, served.id)
                pairs.append(self._pair(served, chosen, rejected, "rating"))
            pairs = [p for p in pairs if self._pair_digest(p) not in self.pairs]
            lines = [] if earlier is not None else [(RATINGS, self._rating_line(served, rating))]
            lines += [(PAIRS[served.kind], pair) for pair in pairs]
            self._append(lines)
            if earlier is None:
                self._note_rating(lines[0][1])
            return pairs

    def prefer(self, served: Served, preferred: str) -> list[dict]:
        """Write the pair (chosen = `preferred`, rejected = the served reply), unless written."""
        with self._lock:
            pair = self._pair(served, (preferred, None), (served.reply, served.id), "preferred")
            if self._pair_digest(pair) in self.pairs:
                return []
            self._append([(PAIRS[served.kind], pair)])
            return [pair]

    def _pair(self, served: Served, chosen, rejected, how: str) -> dict:
        pair = {**served.asked, "chosen": chosen[0], "rejected": rejected[0]}
        ids = {"chosen_id": chosen[1], "rejected_id": rejected[1]}
        source = {"source": f"feedback:{how}", "model": self.model, "created": int(time.time())}
        return {**pair, **{k: v for k, v in ids.items() if v is not None}, **source}

    def _rating_line(self, served: Served, rating: int) -> dict:
        return {
            "id": served.id,
            "rating": rating,
            "kind": served.kind,
            "asked": served.asked,
            "reply": served.reply,
            "model": self.model,
            "created": int(time.time()),
        }

    def _append(self, lines: list[tuple[Path, dict]]) -> None:
        """Write every line durably, or none when they would pass the cap (Refused)."""
        if not lines:
            return
        encoded = [(name, (json.dumps(r, ensure_ascii=False) + "\n").encode()) for name, r in lines]
        size = sum(len(data) for _, data in encoded)
        if self.size + size > self.max_bytes:
            raise Refused(
                413,
                f"the feedback files are full: {self.size} of their {self.max_bytes} bytes "
                f"are used (--feedback-max-bytes); move {self.directory} away or raise the cap",
                None,
                "feedback_full",
            )
        starts: dict[int, int] = {}  # each file's length before this feedback
        try:
            for name, data in encoded:
                fd = self._fd(name)
                fcntl.flock(fd, fcntl.LOCK_EX)  # a second server on this directory waits
                try:
                    starts.setdefault(fd, os.fstat(fd).st_size)
                    view = memoryview(data)
                    while view:  # one write per line on a regular file; a short write goes on
                        view = view[os.write(fd, view) :]
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            for fd in starts:
                os.fsync(fd)
        except OSError as error:  # e.g. the disk is full: none of it acknowledged, none kept
            for fd, start in starts.items():
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise Refused(
                500,
                f"cannot write feedback in {self.directory}: {error.strerror or error}",
                None,
                "write_failed",
            ) from None
        self.size += size
        for _, record in lines:
            if "chosen" in record:
                self.pairs.add(self._pair_digest(record))

    def _fd(self, name: Path) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        path = self.directory / name
        try:
            made = _make_dirs(path.parent)
            new = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise Refused(
                500,
                f"cannot write feedback to {path}: {error.strerror or error}",
                None,
                "write_failed",
            ) from None
        if new:  # the new name itself durable: sync the directories made or changed
            for directory in {*made, path.parent}:
                _sync_dir(directory)
        self._fds[name] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _make_dirs(directory: Path) -> list[Path]:
    """Make `directory` and missing parents; the existing parents whose entries changed."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return [path.parent for path in missing]


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_pairable(served: Served) -> None:
    """A chat pair is the assistant's next turn: the conversation must end with the user's."""
    if served.kind == CHAT and served.asked["messages"][-1]["role"] != "user":
        raise Refused(
            400,
            f"id: {served.id} answered a conversation ending with an assistant message; a "
            "preference pair needs the user's message last",
            "id",
        )


class Feedback:
    """What the server keeps for feedback: the replies it gave and the files."""

    def __init__(self, options: FeedbackOptions, run_dir: str | Path, model: str = ""):
        options.check()
        self.options = options
        self.enabled = options.max_bytes > 0
        self.directory = Path(options.directory or Path(run_dir) / "feedback")
        self.memory = Memory(options.remember)
        self.store = Store(self.directory, options.max_bytes, model) if self.enabled else None

    def track(
        self, pieces: AsyncIterator, id_: str, messages=None, prompt: str | None = None
    ) -> AsyncIterator:
        """`pieces` (a reply's Piece stream) passed through; the reply is remembered under
        `id_` once it finishes (its last piece, before that piece is handed on)."""
        if not self.enabled:
            return pieces
        kind, asked = (CHAT, {"messages": messages}) if messages is not None else (COMPLETION, {})
        asked = asked or {"prompt": prompt}

        async def tracked():
            text, kept = [], False
            async for piece in pieces:
                text.append(piece.text)
                if piece.finish and not kept:
                    self.memory.remember(Served(id_, kind, asked, "".join(text)))
                    kept = True
                yield piece
            if not kept:
                self.memory.remember(Served(id_, kind, asked, "".join(text)))

        return tracked()

    # --- the request

    def answer(self, raw: bytes) -> dict:
        """Apply one feedback request (its raw body); the 200 answer, or Refused."""
        if not self.enabled:
            raise Refused(404, "feedback is off on this server (--feedback-max-bytes 0)")
        if len(raw) > self.options.max_body:
            raise Refused(
                413,
                f"a feedback body is at most {self.options.max_body} bytes",
                None,
                "request_too_large",
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object: {id, rating} or {id, preferred}")
        id_ = body.get("id")
        if not isinstance(id_, str) or not 0 < len(id_) <= MAX_ID:
            raise Refused(400, "id: the id of a completion this server gave (a string)", "id")
        rating, preferred = body.get("rating"), body.get("preferred")
        if (rating is None) == (preferred is None):
            raise Refused(400, "give a rating ('good'/'bad', 1/-1) or a preferred reply: one")
        served = self.memory.get(id_)
        if served is None:
            raise Refused(
                404,
                f"id: {id_} is not a reply this server gave, or is older than the "
                f"{self.options.remember} it remembers (--feedback-remember)",
                "id",
                "unknown_completion",
            )
        _check_pairable(served)
        if rating is not None:
            if not isinstance(rating, str | int) or isinstance(rating, bool):
                rating = None  # not a name of one
            if rating not in RATING_NAMES:
                raise Refused(400, "rating: 'good' or 'bad' (or 1 or -1)", "rating")
            pairs = self.store.rate(served, RATING_NAMES[rating])
            return self._answer(served, pairs, RATING_NAMES[rating])
        self._check_reply(served, preferred)
        return self._answer(served, self.store.prefer(served, preferred), None)

    @staticmethod
    def _check_reply(served: Served, preferred) -> None:
        if not isinstance(preferred, str) or not preferred.strip():
            raise Refused(400, "preferred: a non-empty reply (a string)", "preferred")
        if preferred == served.reply:
            raise Refused(400, "preferred: the same as the reply given: no preference in it")
        marks = [m for m in (chat.END, *chat.MARKERS.values()) if m in preferred]
        if marks:
            raise Refused(400, f"preferred: the reply's text only, without {marks[0]}", "preferred")

    def _answer(self, served: Served, pairs: list[dict], rating: int | None) -> dict:
        where = PAIRS[served.kind]
        return {
            "object": "feedback",
            "id": served.id,
            "rating": rating,
            "pairs": len(pairs),
            "file": str(where),
        }

    def add_route(self, app) -> None:
        """POST /v1/feedback on `app` (errors in OpenAI's JSON shape)."""
        from fastapi import Request
        from fastapi.responses import JSONResponse

        @app.post("/v1/feedback")
        async def feedback(request: Request):
            raw = await request.body()
            try:
                return await asyncio.to_thread(self.answer, raw)  # the fsync off the event loop
            except Refused as error:
                kind = "server_error" if error.status >= 500 else "invalid_request_error"
                body = {"message": str(error), "type": kind}
                body |= {"param": error.param, "code": error.code}
                return JSONResponse({"error": body}, status_code=error.status)


def add_flags(p) -> None:
    """`gptjax serve`'s feedback flags on an argparse parser."""
    default = FeedbackOptions()
    p.add_argument("--feedback-dir", default=None, help="feedback files (default RUN/feedback)")
    p.add_argument(
        "--feedback-max-bytes",
        type=int,
        default=default.max_bytes,
        help="cap of the feedback files (0: no /v1/feedback)",
    )
    p.add_argument(
        "--feedback-remember", type=int, default=default.remember, help="replies kept for feedback"
    )


def options(args) -> FeedbackOptions:
    directory = Path(args.feedback_dir) if args.feedback_dir else None
    return FeedbackOptions(directory, args.feedback_max_bytes, args.feedback_remember)
