"""Many long-lived HTTP/1.1 connections through the lab, each sending a request every
``interval``: which of them break, and when.

:class:`LongLived` opens ``n`` keep-alive connections from a client namespace to a VIP
and then, from one asyncio loop in one thread inside that namespace, sends ``GET /`` on
each every ``interval`` seconds (staggered), reading the answer (a lab server names
itself in it, :mod:`netns.servers`). A connection is **broken** when it is reset or
closed, when an answer takes longer than ``timeout`` (TCP retransmits a lost segment
well within it) or when another real answers; it is then closed and not retried. The
tests read :meth:`LongLived.broken` before and after each change to count what the
change broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Self

from lb.kernel.netns import NetnsRef, run_in_netns
from netns.servers import format_endpoint, parse_ident


@dataclass
class Conn:
    """One long-lived connection: its source port, the real that answered first, and
    when / why it broke (None: alive)."""

    sport: int = 0
    real: str | None = None
    requests: int = 0
    broken_at: float | None = None
    why: str | None = None


class LongLived:
    """``n`` long-lived connections to ``host``:``port`` from namespace ``ns``."""

    def __init__(self, ns: NetnsRef, host: str, port: int, n: int, *, interval: float = 0.1,
                 timeout: float = 10.0, connect_timeout: float = 10.0) -> None:
        self.ns, self.host, self.port, self.n = ns, host, port, n
        self.interval, self.timeout, self.connect_timeout = interval, timeout, connect_timeout
        self.conns = [Conn() for _ in range(n)]
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> Self:
        """Open every connection (each answers once) and start the request loops; raises
        if they are not all up within ``timeout``."""
        self._thread = threading.Thread(target=self._run, name=f"longlived-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.n} connections to {self.host}:{self.port} not up in {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            run_in_netns(self.ns, asyncio.run, self._main())
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        request = f"GET / HTTP/1.1\r\nHost: {format_endpoint(self.host, self.port)}\r\n\r\n".encode()
        streams = await asyncio.gather(*(self._open(i) for i in range(self.n)))
        self._ready.set()
        await asyncio.gather(*(self._loop_one(i, r, w, request) for i, (r, w) in enumerate(streams)))

    async def _open(self, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, family=fam),
                                      self.connect_timeout)
        c = self.conns[i]
        c.sport = w.get_extra_info("sockname")[1]
        c.real = await asyncio.wait_for(self._get(r, w, f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()),
                                        self.connect_timeout)
        return r, w

    async def _get(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> str:
        w.write(request)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        body = await r.readexactly(length)
        return parse_ident(body.decode())["real"]

    async def _loop_one(self, i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> None:
        assert self._stop is not None
        c = self.conns[i]
        with contextlib.suppress(asyncio.TimeoutError):  # stagger the connections over one interval
            await asyncio.wait_for(self._stop.wait(), self.interval * i / max(1, self.n))
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                real = await asyncio.wait_for(self._get(r, w, request), self.timeout)
            except TimeoutError:
                c.broken_at, c.why = time.monotonic(), f"no answer in {self.timeout} s"
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
                c.broken_at, c.why = time.monotonic(), f"{type(e).__name__}: {e}"
            else:
                c.requests += 1
                if real != c.real:
                    c.broken_at, c.why = time.monotonic(), f"answered by {real}, not {c.real}"
            if c.broken_at is not None:
                w.close()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.interval - (time.monotonic() - t0)))
        w.close()

    def broken(self) -> int:
        """Connections broken so far."""
        return sum(1 for c in self.conns if c.broken_at is not None)

    def requests(self) -> int:
        """Requests answered so far (all connections)."""
        return sum(c.requests for c in self.conns)

    def reals(self) -> set[str]:
        """The reals the connections are on."""
        return {c.real for c in self.conns if c.real}

    def stop(self) -> None:
        """End the loops and close every connection."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
