"""What every request passes through before a route sees it: a request id (the
``X-Request-Id`` header of every response, and the key to the log line of a 5xx) and a
cap on the request body (413 beyond it, whether the body announces its length or not).

A pure ASGI middleware, so that the body is counted as it arrives and never buffered
beyond the cap.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.errors import CallerError

__all__ = ["MAX_BODY_BYTES", "REQUEST_ID_HEADER", "BodyTooLarge", "RequestGuard", "request_id"]

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a config of thousands of VIPs; `lbctl serve --max-body-bytes`
REQUEST_ID_HEADER = "X-Request-Id"


class BodyTooLarge(CallerError):
    """The request body is longer than the daemon accepts."""

    status = 413
    kind = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes", [("(body)", f"at most {limit} bytes")])


def request_id(request: Request) -> str:
    """The id :class:`RequestGuard` gave this request ('-' outside it)."""
    return str(request.scope.get("state", {}).get("request_id", "-"))


class RequestGuard:
    """Give every request an id; refuse bodies over ``max_body`` bytes with 413."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and not any(
                    k.lower() == header[0] for k, _ in message.get("headers", [])):  # a 5xx sets its own
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _refuse(BodyTooLarge(self.max_body), send_with_id)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # chunked, or longer than it said: stop reading
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, counted, send_with_id)


async def _refuse(exc: BodyTooLarge, send: Any) -> None:
    body = json.dumps(exc.to_json()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
