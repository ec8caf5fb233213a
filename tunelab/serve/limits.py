"""Request bodies counted as they arrive: too large answers 413 and too slow answers 408, before the rest is read.

A Content-Length header is only a claim: a chunked body may follow it, or a client may send more than it
declared. So the limit is enforced on the bytes the server receives, in an ASGI wrapper around `receive`; the
declared length only lets an honest oversized request be refused before a byte of it is read. Uploads get the
service's upload limit, every other request (JSON) a small one. uvicorn has no timeout for a body that stops
half-way, so the wrapper gives each body chunk BODY_TIMEOUT seconds.

The errors are FastAPI HTTPExceptions on purpose: FastAPI turns any other exception raised while it reads a body
into a 400 "error parsing the body", but re-raises these, and the app's handler answers in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi.exceptions import HTTPException  # FastAPI re-raises its own kind from a body read, not Starlette's

JSON_BYTES = 1 << 20  # a job request or a chat call is a few KB; 1 MiB leaves room for long conversations
ENVELOPE = 64 * 1024  # multipart headers and boundaries around an uploaded file
BODY_TIMEOUT = 30.0  # seconds a client may pause while sending a body


CLOSE = {"Connection": "close"}  # uvicorn then closes the connection instead of reading the rest of the body


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, upload: bool):
        what = "upload" if upload else "request body"
        super().__init__(413, f"the {what} is larger than the limit of {limit / 2**20:g} MB", CLOSE)
        self.code, self.param = ("file_too_large", "file") if upload else ("request_too_large", None)


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stopped arriving for {seconds:g} s", CLOSE)
        self.code, self.param = "request_timeout", None


class LimitBody:
    """ASGI middleware: counts each request's body bytes against its limit and times out a stalled body."""

    def __init__(self, app, upload_bytes: int, json_bytes: int = JSON_BYTES, timeout: float = BODY_TIMEOUT):
        self.app, self.upload_bytes, self.json_bytes, self.timeout = app, upload_bytes, json_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"] == "/v1/files"
        limit = self.upload_bytes + ENVELOPE if upload else self.json_bytes
        shown = self.upload_bytes if upload else self.json_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _answer(send, BodyTooLarge(shown, upload))
        received, done, started = 0, False, False

        async def limited_receive():
            nonlocal received, done
            if done:  # the body is in: what follows is the wait for a disconnect (streaming responses)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(shown, upload)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as e:  # raised where no handler saw it (e.g. in a middleware)
            if started:
                raise
            await _answer(send, e)


def error_body(e: HTTPException) -> dict:
    return {"error": {"message": e.detail, "type": "invalid_request_error", "param": getattr(e, "param", None),
                      "code": getattr(e, "code", None)}}


async def _answer(send, e: HTTPException) -> None:
    body = json.dumps(error_body(e)).encode()
    await send({"type": "http.response.start", "status": e.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RateLimit:
    """Requests per key: a token bucket per key id that refills at `per_minute` a minute and holds a tenth of that
    (at least one), so a client may burst briefly and then keeps the average. In the API process's memory: one
    server's count (a restart forgets it)."""

    def __init__(self, per_minute: float):
        self.per_minute = per_minute
        self.rate, self.capacity = per_minute / 60.0, max(1.0, per_minute / 10.0)
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when counted)

    def take(self, key_id: str, at: float | None = None) -> float:
        """Spend one token of `key_id`'s bucket: 0 when there was one, else the seconds until there is."""
        at = time.monotonic() if at is None else at
        tokens, last = self.buckets.get(key_id, (self.capacity, at))
        tokens = min(self.capacity, tokens + (at - last) * self.rate)
        if tokens >= 1:
            self.buckets[key_id] = (tokens - 1, at)
            return 0.0
        self.buckets[key_id] = (tokens, at)
        return (1 - tokens) / self.rate
