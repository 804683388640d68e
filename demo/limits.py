"""A request-size limit in front of every route of the app (pure ASGI middleware).

Why: Gradio's ``max_file_size`` guards only ``/gradio_api/upload``. An image sent inline as a base64 ``data:``
URL in a JSON body bypassed it, and bodies of any size were read into memory (a 400 MB body raised the server's
RSS by ≈ 1.9 GB, and RSS ratcheted up over many such bodies). This middleware answers 413 to any HTTP request
whose body exceeds ``max_bytes``: at once when ``Content-Length`` says so, otherwise as soon as the streamed
body passes the limit (the app then sees a disconnect and nothing more of the body is buffered).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The largest body a legitimate request sends: one upload of max_file_size (25 MB) plus multipart overhead.
MAX_BODY_BYTES = 26 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: HTTP bodies larger than ``max_bytes`` get ``413 Payload Too Large``."""

    def __init__(self, app: Callable, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(send, self.max_bytes)
        seen, refused, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await _too_large(send, self.max_bytes)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; whatever the app answers to the disconnect is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = f"request body too large (limit {max_bytes // (1024 * 1024)} MB)".encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
