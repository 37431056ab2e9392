"""The lab's real servers, and the clients that talk to them.

Server side (one process per real, started inside the real's namespace by
:mod:`netns.lab`, ``python -m netns.servers --name r1 ...``):

* **HTTP** on every TCP VIP (address:port): each response body is one line
  ``real=<name> addr=<real address> [len=<request body length>]``, where the address is
  the real's own address of the connection's family (the tunnel destination the balancer
  chose). HTTP/1.1 keeps the connection open unless the client says
  ``Connection: close``; HTTP/1.0 and ``Connection: close`` get the server closing first.
  A ``POST`` body is read (``Content-Length``) and its length reported, which is how the
  tests push full-size segments through the tunnel.
* **UDP echo** on every UDP VIP: the reply is ``<name> `` + the datagram, sent from the
  VIP (the socket is bound to the VIP, so the reply's source is right for DSR).
* **Admin** on the real's own address, TCP port ``ADMIN_PORT``: ``GET /stats`` returns
  the counters as JSON (never through the balancer).

The server binds the VIPs themselves, not a wildcard: the VIP sits on the real's
loopback, and a socket bound to it answers from it. It prints ``ready`` on stdout once
every socket is bound, then stops writing to stdout (the parent may be gone), and exits
on SIGTERM/SIGINT.

Client side (used by the tests and ``lbctl lab demo``; each runs in a thread that has
entered the client's namespace, so every socket it makes belongs to that namespace):
:func:`http_requests` (a new TCP connection per request, many in flight),
:class:`KeepAliveClient` (one long-lived connection), :func:`udp_flows`, :func:`ping`,
:func:`admin_stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

from lb.kernel.netns import run_in_netns

ADMIN_PORT = 8080
HTTP_HEAD_LIMIT = 16 * 1024  # longest request head accepted
MAX_BODY = 16 * 1024 * 1024

# ---------------------------------------------------------------------------------------
# server


def _endpoint(text: str) -> tuple[str, int]:
    """'198.18.0.100:80' or '[2001:db8::100]:80' -> (address, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    ipaddress.ip_address(host)
    return host, int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server:
    def __init__(self, name: str, addr4: str | None, addr6: str | None) -> None:
        self.name = name
        self.addr = {4: addr4, 6: addr6}
        self.stats: Counter[str] = Counter()

    def ident(self, family: int) -> str:
        return f"real={self.name} addr={self.addr[6 if family == socket.AF_INET6 else 4]}"

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   admin: bool = False) -> None:
        sock = writer.get_extra_info("socket")
        family = sock.family if sock is not None else socket.AF_INET
        self.stats["admin_connections" if admin else "http_connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split()
                if len(parts) != 3:
                    return
                method, path, version = parts
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if not 0 <= length <= MAX_BODY:
                    return
                body = await reader.readexactly(length) if length else b""
                if admin:
                    status, text = (("200 OK", json.dumps(self.snapshot()) + "\n") if path == "/stats"
                                    else ("404 Not Found", "not found\n"))
                else:
                    self.stats["http_requests"] += 1
                    text = self.ident(family) + (f" len={len(body)}" if method == "POST" else "") + "\n"
                    status = "200 OK"
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                data = text.encode()
                writer.write(
                    f"{version} {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                    f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode() + data)
                await writer.drain()
                if not keep:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def snapshot(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "addr4": self.addr[4],
                "addr6": self.addr[6], **{k: int(v) for k, v in self.stats.items()}}


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.server.stats["udp_datagrams"] += 1
        assert self.transport is not None
        self.transport.sendto(self.server.name.encode() + b" " + data, addr)


async def serve(name: str, addr4: str | None, addr6: str | None, tcp: Sequence[tuple[str, int]],
                udp: Sequence[tuple[str, int]], admin: Sequence[tuple[str, int]],
                ready=None, quic: Sequence[tuple[str, int]] = (),
                quic_ids: Mapping[str, int] | None = None) -> None:
    """Bind everything, call ``ready()``, serve until SIGTERM/SIGINT. ``quic``: VIP
    endpoints served by :class:`netns.quic.QuicEcho`, which hands out connection ids
    carrying this real's server id (``quic_ids``: own address -> id)."""
    from netns.quic import QuicEcho

    ids = quic_ids or {}
    srv = _Server(name, addr4, addr6)
    loop = asyncio.get_running_loop()
    closers = []
    for host, port in tcp:
        s = await asyncio.start_server(srv.http, host, port, reuse_address=True, backlog=4096)
        closers.append(s)
    for host, port in admin:
        s = await asyncio.start_server(lambda r, w: srv.http(r, w, admin=True), host, port,
                                       reuse_address=True)
        closers.append(s)
    for host, port in udp:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(lambda: _Echo(srv), local_addr=(host, port),
                                                           family=fam)
        closers.append(transport)
    for host, port in quic:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sid = ids.get((addr6 if fam == socket.AF_INET6 else addr4) or "", 0)
        transport, _ = await loop.create_datagram_endpoint(
            lambda sid=sid: QuicEcho(srv.name, sid, srv.stats), local_addr=(host, port), family=fam)
        closers.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    await stop.wait()
    for c in closers:
        c.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netns.servers",
                                description="The lab's real server: HTTP and UDP echo on the VIPs.")
    p.add_argument("--name", required=True, help="the real's name, e.g. r1 (goes into every reply)")
    p.add_argument("--addr4", help="the real's own IPv4 address (reported in HTTP replies)")
    p.add_argument("--addr6", help="the real's own IPv6 address")
    p.add_argument("--tcp", action="append", default=[], type=_endpoint, metavar="ADDR:PORT",
                   help="serve HTTP on this VIP endpoint (repeatable)")
    p.add_argument("--udp", action="append", default=[], type=_endpoint, metavar="ADDR:PORT",
                   help="serve UDP echo on this VIP endpoint (repeatable)")
    p.add_argument("--admin", action="append", default=[], type=_endpoint, metavar="ADDR:PORT",
                   help="serve GET /stats here (the real's own address)")
    p.add_argument("--quic", action="append", default=[], type=_endpoint, metavar="ADDR:PORT",
                   help="serve QUIC-shaped UDP on this VIP endpoint (netns/quic.py; repeatable)")
    p.add_argument("--quic-id", action="append", default=[], metavar="ADDR=ID",
                   help="this real's QUIC server id for its own address ADDR (repeatable)")
    args = p.parse_args(argv)

    def ready() -> None:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        # The parent reads one line and may exit; never write to that pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    from netns.quic import parse_quic_ids

    asyncio.run(serve(args.name, args.addr4, args.addr6, args.tcp, args.udp, args.admin, ready,
                      args.quic, parse_quic_ids(args.quic_id)))
    return 0


# ---------------------------------------------------------------------------------------
# clients


def parse_ident(text: str) -> dict[str, str]:
    """'real=r1 addr=198.18.101.2 len=5' -> {'real': 'r1', 'addr': ..., 'len': '5'}."""
    out = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out


@dataclass
class HttpResult:
    """One request on its own TCP connection."""

    sport: int  # the client's source port
    real: str | None  # which real answered (None: the request failed)
    addr: str | None  # the real's address as it reported it
    error: str | None = None
    body_len: int | None = None  # POST: the length the real received


async def _one_request(host: str, port: int, sport: int | None, timeout: float, body: bytes | None
                       ) -> HttpResult:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    got_port = 0
    try:
        sock.setblocking(False)
        if sport is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        got_port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection(sock=sock)
        sock = None  # the transport owns it now
        try:
            method = "POST" if body is not None else "GET"
            head = (f"{method} / HTTP/1.1\r\nHost: {format_endpoint(host, port)}\r\n"
                    f"Connection: close\r\nContent-Length: {len(body or b'')}\r\n\r\n").encode()
            writer.write(head + (body or b""))
            data = await asyncio.wait_for(reader.read(), timeout)  # to EOF: the server closes first
        finally:
            # RST instead of FIN: no TIME_WAIT on either side, so a test may reuse the
            # same source port at once (the server has already closed its side).
            raw = writer.get_extra_info("socket")
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        head_end = data.find(b"\r\n\r\n")
        if not data.startswith(b"HTTP/1.1 200") or head_end < 0:
            return HttpResult(got_port, None, None, f"bad response {data[:40]!r}")
        ident = parse_ident(data[head_end + 4:].decode())
        blen = int(ident["len"]) if "len" in ident else None
        return HttpResult(got_port, ident.get("real"), ident.get("addr"), None, blen)
    except (OSError, TimeoutError) as e:
        return HttpResult(got_port or (sport or 0), None, None, f"{type(e).__name__}: {e}")
    finally:
        if sock is not None:
            sock.close()


async def _many(host: str, port: int, n: int, concurrency: int, sports: Sequence[int] | None,
                timeout: float, body: bytes | None) -> list[HttpResult]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> HttpResult:
        async with sem:
            return await _one_request(host, port, sports[i] if sports is not None else None,
                                      timeout, body)

    count = len(sports) if sports is not None else n
    return list(await asyncio.gather(*(one(i) for i in range(count))))


def http_requests(ns, host: str, port: int = 80, n: int = 100, *, concurrency: int = 32,
                  sports: Sequence[int] | None = None, timeout: float = 5.0,
                  body: bytes | None = None) -> list[HttpResult]:
    """``n`` HTTP requests to ``host:port`` from namespace ``ns``, each on a new TCP
    connection, ``concurrency`` in flight. With ``sports``, one request per listed
    source port (bound explicitly; ``n`` is ignored). ``body``: POST it instead of GET."""
    return run_in_netns(ns, asyncio.run, _many(host, port, n, concurrency, sports, timeout, body))


class KeepAliveClient:
    """One long-lived HTTP/1.1 connection from namespace ``ns``; every :meth:`get`
    sends a request on it and returns the name of the real that answered."""

    def __init__(self, ns, host: str, port: int = 80, timeout: float = 5.0) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host, self.port = host, port
        self.sock = run_in_netns(ns, socket.socket, fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.sport = self.sock.getsockname()[1]
        self._buf = b""

    def get(self) -> str:
        self.sock.sendall(f"GET / HTTP/1.1\r\nHost: {format_endpoint(self.host, self.port)}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buf:
            self._recv()
        head, _, rest = self._buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        while len(rest) < length:
            self._buf = head + b"\r\n\r\n" + rest
            self._recv()
            head, _, rest = self._buf.partition(b"\r\n\r\n")
        body, self._buf = rest[:length], rest[length:]
        return parse_ident(body.decode())["real"]

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the long-lived connection")
        self._buf += data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_flows(ns, host: str, port: int = 7, flows: int = 20, per_flow: int = 5, *,
              timeout: float = 2.0, sports: Sequence[int] | None = None) -> dict[int, list[str | None]]:
    """``flows`` UDP flows (one socket, one source port each) sending ``per_flow``
    datagrams each; returns source port -> the real named in each reply (None: lost)."""

    def run() -> dict[int, list[str | None]]:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        socks = []
        try:
            for i in range(len(sports) if sports is not None else flows):
                s = socket.socket(fam, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sports[i] if sports else 0))
                s.settimeout(timeout)
            out: dict[int, list[str | None]] = {}
            for s in socks:
                sport = s.getsockname()[1]
                names: list[str | None] = []
                for k in range(per_flow):
                    payload = f"flow {sport} datagram {k}".encode()
                    s.sendto(payload, (host, port))
                    try:
                        data, _ = s.recvfrom(65536)
                    except TimeoutError:
                        names.append(None)
                        continue
                    name, _, echoed = data.partition(b" ")
                    names.append(name.decode() if echoed == payload else None)
                out[sport] = names
            return out
        finally:
            for s in socks:
                s.close()

    return run_in_netns(ns, run)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns, host: str, count: int = 3, timeout: float = 1.0) -> int:
    """ICMP / ICMPv6 echo requests from namespace ``ns``; returns how many replies came
    back from ``host``."""

    def run() -> int:
        v6 = ":" in host
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        s.settimeout(timeout)
        ident = random.randrange(1, 0xFFFF)
        got = 0
        try:
            for seq in range(count):
                payload = b"lab ping" + struct.pack("!d", time.time())
                typ = 128 if v6 else 8
                hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq)
                csum = 0 if v6 else _icmp_checksum(hdr + payload)  # the kernel sums ICMPv6
                s.sendto(struct.pack("!BBHHH", typ, 0, csum, ident, seq) + payload, (host, 0))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        data, addr = s.recvfrom(2048)
                    except TimeoutError:
                        break
                    msg = data if v6 else data[(data[0] & 0x0F) * 4:]
                    if len(msg) < 8 or ipaddress.ip_address(addr[0]) != ipaddress.ip_address(host):
                        continue
                    rtype, _, _, rid, rseq = struct.unpack("!BBHHH", msg[:8])
                    if rtype == (129 if v6 else 0) and rid == ident and rseq == seq:
                        got += 1
                        break
        finally:
            s.close()
        return got

    return run_in_netns(ns, run)


def admin_stats(ns, addr: str, port: int = ADMIN_PORT, timeout: float = 2.0) -> dict:
    """GET /stats from a real's admin endpoint, from namespace ``ns``."""

    def run() -> dict:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((addr, port))
            s.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])

    return run_in_netns(ns, run)


def count_by_real(results: Iterable[HttpResult]) -> Counter[str]:
    return Counter(r.real for r in results if r.real is not None)


if __name__ == "__main__":
    sys.exit(main())
