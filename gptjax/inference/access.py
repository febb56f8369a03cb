"""Who may use `gptjax serve` and how much one request may ask: API keys, the exposure check for
non-loopback addresses, and the request limits (docs/chat.md, "Serving to a team safely").

    Guard        an ASGI middleware in front of the app: every path but /health needs
                 `Authorization: Bearer KEY` when keys are set (401 otherwise); the body is
                 read here, capped in size (413, from Content-Length before reading, then as
                 it streams in) and in time (408), then handed to the app
    load_keys    the keys of --api-key, GPTJAX_API_KEY and --api-key-file (one per line)
    exposure     refuse a non-loopback address without a key, unless --allow-unauthenticated

Keys are compared in constant time against every key (hmac.compare_digest of SHA-256 digests,
so neither a key's content nor its length shows in the timing; no early exit) and never logged
or echoed: errors name the file or the flag, never a key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path

from gptjax.errors import UserError

KEY_ENV = "GPTJAX_API_KEY"
OPEN_PATHS = frozenset({"/health"})


class AccessError(UserError):
    """`gptjax serve` cannot start as asked: no usable key, or an open public address."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask (each a `gptjax serve` flag; None: the model's context)."""

    max_body_bytes: int = 4 * 1024 * 1024  # 128 token-id prompts of 4,096 tokens fit
    max_prompts: int = 128  # prompts in one /v1/completions request
    max_stops: int = 4  # stop strings in one request (OpenAI's limit)
    max_tokens: int | None = None  # new tokens one request may ask; None: the context
    body_timeout: float = 30.0  # seconds to receive a whole request body
    keep_alive: float = 5.0  # seconds an idle connection stays open (uvicorn's)
    max_batch: int = 8  # requests generating together (rows of the decode batch)
    max_queue: int = 64  # requests waiting for a row; more: 503 with Retry-After
    request_timeout: float | None = 600.0  # seconds a request may take, queued or generating

    def check(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "max_stops", "max_batch"):
            if getattr(self, name) < 1:
                raise AccessError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise AccessError("--max-tokens must be at least 1")
        if self.max_queue < 0:
            raise AccessError("--max-queue must be 0 or more")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise AccessError("--request-timeout must be positive (seconds)")
        for name in ("body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise AccessError(f"--{name.replace('_', '-')} must be positive (seconds)")


DEFAULT_LIMITS = Limits()


def load_keys(
    key: str | None = None,
    key_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Every accepted key: --api-key, the environment's GPTJAX_API_KEY, the file's lines
    (blank lines and `#` comments skipped). Empty when none is given."""
    keys = [k.strip() for k in (key, (environ or {}).get(KEY_ENV)) if k is not None]
    if any(not k for k in keys):
        raise AccessError(
            f"an empty API key (--api-key or {KEY_ENV}): give a key or leave it unset"
        )
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise AccessError(f"cannot read --api-key-file {key_file}: {error}") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise AccessError(f"--api-key-file {key_file} holds no key (one per line)")
        keys += found
    for k in keys:
        if any(c.isspace() for c in k) or not k.isprintable():
            raise AccessError("an API key may not contain spaces or control characters")
    return tuple(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every interface): others may reach it
        return False


def exposure(host: str, keys: Iterable[str], allow_unauthenticated: bool) -> str | None:
    """Refuse (AccessError) a non-loopback address without a key unless allowed; the warning
    line to print when allowed; None when there is nothing to say."""
    if is_loopback(host) or tuple(keys):
        return None
    if not allow_unauthenticated:
        raise AccessError(
            f"--host {host or '(every interface)'} lets other machines use this model: give "
            f"--api-key, {KEY_ENV} or --api-key-file, or --allow-unauthenticated (a trusted "
            "network, or a proxy that checks access)"
        )
    return (
        f"gptjax: warning: no API key on {host or '(every interface)'}: anyone who can reach "
        "this port can use the model"
    )


def _error(status: int, message: str, code: str, headers: dict | None = None):
    from starlette.responses import JSONResponse  # the serve extra; the CLI's flags need none

    body = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


def authorized(header: str | None, digests: tuple[bytes, ...]) -> bool:
    """`Authorization: Bearer KEY` with a key whose `digest` is one of `digests`; every one is
    compared, in constant time."""
    scheme, _, given = (header or "").partition(" ")
    mine = digest(given.strip())
    match = False
    for known in digests:
        match |= hmac.compare_digest(mine, known)
    return match and scheme.lower() == "bearer"


class Guard:
    """The ASGI middleware in front of the app (this module's docstring)."""

    def __init__(self, app, keys: Iterable[str] = (), limits: Limits = DEFAULT_LIMITS):
        self.app, self.limits = app, limits
        self.keys = tuple(digest(k) for k in keys)  # the keys themselves are not kept

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys and scope["path"] not in OPEN_PATHS:
            if not authorized(headers.get("authorization"), self.keys):
                answer = _error(
                    401,
                    "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                    "invalid_api_key",
                    {"www-authenticate": "Bearer"},
                )
                return await answer(scope, receive, send)
        most = self.limits.max_body_bytes
        too_big = _error(413, f"the request body is over {most} bytes", "request_too_large")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > most):
            if length.isdigit():
                return await too_big(scope, receive, send)
            return await _error(400, "a bad Content-Length", "invalid_request")(
                scope, receive, send
            )
        try:
            body = await asyncio.wait_for(self._read(receive, most), self.limits.body_timeout)
        except TimeoutError:
            seconds = self.limits.body_timeout
            late = _error(408, f"the request body took over {seconds:g} s", "request_timeout")
            return await late(scope, receive, send)
        if body is None:
            return await too_big(scope, receive, send)
        if body is _GONE:
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # then what the client does next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive, most: int):
        """The whole body; None once over `most` bytes; _GONE if the client disconnects."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > most:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


_GONE = object()
