"""A synchronous client of the control plane's API in this process, no socket.

:class:`ApiClient` runs ``httpx.AsyncClient`` over ``httpx.ASGITransport`` on a private
event loop in a thread: requests go through the real ASGI app (routing, validation,
error bodies), so a benchmark times the API itself and tests drive it without a daemon.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any

import httpx

__all__ = ["ApiClient"]


class ApiClient:
    """``client.get('/v1/vips')`` etc. run on a private event loop in a thread; each call
    returns an ``httpx.Response``. ``gather([(method, url, kwargs), ...])`` sends them
    concurrently."""

    def __init__(self, app: Any, headers: dict[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="api-client")
        self._thread.start()
        transport = httpx.ASGITransport(app=app)

        async def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=transport, base_url="http://lb", headers=headers or {})

        self.client = self._call(make())

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self._call(self.client.request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def patch(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PATCH", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)

    def gather(self, calls: Iterable[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            return await asyncio.gather(*(self.client.request(m, u, **kw) for m, u, kw in calls))

        return self._call(run())

    def close(self) -> None:
        self._call(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
