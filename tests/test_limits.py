"""demo/limits.py: the request-size limit, on a bare ASGI app (the running demo is tested in test_app_client)."""
from __future__ import annotations

import asyncio

from demo.limits import BodyLimit


def _run(limit: int, chunks: list[bytes], content_length: int | None):
    """Sends ``chunks`` through BodyLimit to an app that reads the whole body; returns (status, body read)."""
    read = bytearray()
    sent: list[dict] = []

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            read.extend(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    asyncio.run(BodyLimit(app, limit)({"type": "http", "headers": headers}, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1  # exactly one answer
    return starts[0]["status"], bytes(read)


def test_bodies_within_the_limit_pass_untouched():
    assert _run(10, [b"abc", b"defg"], 7) == (200, b"abcdefg")
    assert _run(10, [b"x" * 10], None) == (200, b"x" * 10)


def test_a_declared_oversized_body_is_refused_before_reading_it():
    assert _run(10, [b"x" * 11], 11) == (413, b"")
    assert _run(10, [b"x"], 10**12)[0] == 413  # a lying header is still taken at its word


def test_a_streamed_body_without_length_is_cut_off_at_the_limit():
    status, read = _run(10, [b"x" * 6, b"x" * 6, b"x" * 6], None)
    assert status == 413 and len(read) == 6  # the app never saw the chunk that crossed the limit
