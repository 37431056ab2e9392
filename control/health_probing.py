"""Health checks: pure state machines, a registry of them, and the I/O at the edge.

Sans-IO: :class:`Machine` and :class:`Registry` never read a clock or touch a socket.
They take ``now`` (seconds, monotonic) and return events: :class:`StartProbe` (the
driver must run a probe and report back with :meth:`Registry.on_result`),
:class:`ProbeDone` (a result, for metrics) and :class:`Transition` (a real went up or
down: the runtime rebuilds its VIP's ring). :class:`HealthRunner` is the only piece
that reads the clock and runs probes; the :class:`Prober` it uses is pluggable.

Per (VIP, real) the machine is two things:

* the verdict, a transition table (:data:`TRANSITIONS`): ``up`` goes ``down`` after
  ``fall`` consecutive failures, ``down`` goes ``up`` after ``rise`` consecutive
  successes; a result of the other kind resets the count;
* the probe schedule: one probe in flight at most; a probe starts every ``interval``
  seconds; a probe not back by ``timeout`` is a failure, and its late result is ignored.

A new real starts ``up`` (or as last saved, after a restart) and is probed at once: a
restart does not take healthy reals out of their rings, and a dead one goes after
``fall`` probes.

Transport: :class:`DirectProber` connects to the real's own address from a socket made
by a pluggable factory (the daemon's makes them in the datapath's network namespace).
The next step is probing *through the tunnel*: a socket to the VIP address with SO_MARK
set to the real id, which a tc egress BPF program encapsulates towards that real exactly
as the datapath would. :class:`Target` carries everything that needs (VIP address and
port, real id), so it is another :class:`Prober`, nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from control.ids import VipKey
from control.tables import vip_label
from lb.healthcheck_config import HealthCheck

__all__ = ["TargetKey", "Target", "ProbeResult", "StartProbe", "ProbeDone", "Transition",
           "Machine", "Registry", "IllegalTransition", "TRANSITIONS", "Prober", "DirectProber",
           "HealthRunner", "target_label"]

log = logging.getLogger("lb.health")

TargetKey = tuple[VipKey, str]  # (VIP key, real address)
Verdict = Literal["up", "down"]


def target_label(key: TargetKey) -> str:
    return f"{vip_label(key[0])} -> {key[1]}"


@dataclass(frozen=True)
class Target:
    """What to probe for one real of one VIP."""

    key: TargetKey
    spec: HealthCheck
    port: int  # port probed on the real (spec.port or the VIP's port)
    real_id: int  # for a tunnel prober: SO_MARK = real id
    vip_address: str
    vip_port: int

    @property
    def real_address(self) -> str:
        return self.key[1]


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float | None  # seconds; None if the probe never completed
    detail: str  # "connected", "status 200", "timeout", "connection refused", ...


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartProbe:
    """Run a probe of ``target`` now, give up after ``timeout`` s, report with ``seq``."""

    target: Target
    seq: int
    timeout: float


@dataclass(frozen=True)
class ProbeDone:
    key: TargetKey
    result: ProbeResult


@dataclass(frozen=True)
class Transition:
    key: TargetKey
    old: Verdict
    new: Verdict
    reason: str  # e.g. "3 consecutive failures (last: connection refused)"


class IllegalTransition(RuntimeError):
    """A machine was driven in a way its table does not allow (a bug in the driver)."""


# --- the verdict, as data ----------------------------------------------------------------
#
# (verdict, probe ok?) -> (counter to bump, counter to reset, threshold name, verdict when
# the counter reaches the threshold)
TRANSITIONS: dict[tuple[Verdict, bool], tuple[str, str, str, Verdict]] = {
    ("up", True): ("successes", "failures", "", "up"),
    ("up", False): ("failures", "successes", "fall", "down"),
    ("down", True): ("successes", "failures", "rise", "up"),
    ("down", False): ("failures", "successes", "", "down"),
}


@dataclass
class Machine:
    """One (VIP, real): verdict + probe schedule. Mutable, but only through its methods."""

    target: Target
    verdict: Verdict = "up"
    next_due: float = 0.0
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    seq: int = 0  # probes started
    in_flight: int | None = None  # seq of the probe running
    deadline: float = 0.0
    last: ProbeResult | None = None
    last_change: float | None = None
    totals: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0, "late": 0,
                                                             "transitions": 0})

    def poll(self, now: float) -> list[StartProbe | ProbeDone | Transition]:
        """Time-driven events: a probe timing out, a probe due."""
        out: list[StartProbe | ProbeDone | Transition] = []
        if self.in_flight is not None and now >= self.deadline:
            self.in_flight = None
            out += self._record(ProbeResult(False, None, "timeout"), now)
        if self.in_flight is None and now >= self.next_due:
            self.seq += 1
            self.in_flight = self.seq
            spec = self.target.spec
            self.deadline = now + spec.timeout
            # keep the cadence: the next probe is due one interval after this one was
            self.next_due = max(self.next_due + spec.interval, now)
            out.append(StartProbe(self.target, self.seq, spec.timeout))
        return out

    def on_result(self, seq: int, result: ProbeResult, now: float) -> list[ProbeDone | Transition]:
        """A probe's result. One that already timed out (or was superseded) is ignored."""
        if seq > self.seq or seq <= 0:
            raise IllegalTransition(f"{target_label(self.target.key)}: result for probe {seq}, "
                                    f"only {self.seq} started")
        if seq != self.in_flight:
            self.totals["late"] += 1
            return []
        self.in_flight = None
        if result.latency is not None and result.latency > self.target.spec.timeout:
            result = ProbeResult(False, result.latency, f"timeout ({result.detail})")
        return self._record(result, now)

    def _record(self, result: ProbeResult, now: float) -> list[ProbeDone | Transition]:
        self.last = result
        self.totals["success" if result.ok else "failure"] += 1
        bump, reset, threshold, target = TRANSITIONS[(self.verdict, result.ok)]
        setattr(self, bump, getattr(self, bump) + 1)
        setattr(self, reset, 0)
        out: list[ProbeDone | Transition] = [ProbeDone(self.target.key, result)]
        if threshold and getattr(self, bump) >= getattr(self.target.spec, threshold):
            old, self.verdict = self.verdict, target
            self.successes = self.failures = 0
            self.last_change = now
            self.totals["transitions"] += 1
            n = getattr(self.target.spec, threshold)
            what = ("success" if result.ok else "failure") + ("" if n == 1 else "es" if result.ok else "s")
            reason = f"{n} consecutive {what} (last: {result.detail})"
            out.append(Transition(self.target.key, old, target, reason))
        return out

    def next_wakeup(self) -> float:
        return self.deadline if self.in_flight is not None else self.next_due

    def snapshot(self) -> dict[str, Any]:
        last = self.last
        return {
            "vip": vip_label(self.target.key[0]),
            "real": self.target.key[1],
            "state": self.verdict,
            "check": self.target.spec.type,
            "port": self.target.port,
            "consecutive_successes": self.successes,
            "consecutive_failures": self.failures,
            "last_result": None if last is None else {
                "ok": last.ok, "detail": last.detail,
                "latency_ms": None if last.latency is None else round(last.latency * 1000, 3)},
            "probing": self.in_flight is not None,
            "totals": dict(self.totals),
        }


class Registry:
    """All machines, keyed by (VIP key, real address)."""

    def __init__(self) -> None:
        self.machines: dict[TargetKey, Machine] = {}

    def sync(self, targets: Mapping[TargetKey, Target], now: float,
             initial: Mapping[TargetKey, bool] | None = None) -> list[Transition]:
        """Make the machines match ``targets``: new ones start up (or ``initial[key]``)
        and are probed at once; gone ones are dropped; a changed spec keeps the verdict
        and restarts the counts. Returns no events for machines that merely appear or
        go (the runtime decides what they mean)."""
        initial = initial or {}
        for key in [k for k in self.machines if k not in targets]:
            del self.machines[key]
        for key, t in targets.items():
            m = self.machines.get(key)
            if m is None:
                verdict: Verdict = "up" if initial.get(key, True) else "down"
                self.machines[key] = Machine(t, verdict=verdict, next_due=now)
            elif m.target != t:
                spec_changed = m.target.spec != t.spec or m.target.port != t.port
                m.target = t
                if spec_changed:
                    m.successes = m.failures = 0
                    m.in_flight = None
                    m.next_due = now
        return []

    def poll(self, now: float) -> list[StartProbe | ProbeDone | Transition]:
        out: list[StartProbe | ProbeDone | Transition] = []
        for m in self.machines.values():
            out += m.poll(now)
        return out

    def on_result(self, key: TargetKey, seq: int, result: ProbeResult, now: float
                  ) -> list[ProbeDone | Transition]:
        m = self.machines.get(key)
        if m is None:
            return []  # the target went away while its probe ran
        return m.on_result(seq, result, now)

    def next_wakeup(self) -> float | None:
        return min((m.next_wakeup() for m in self.machines.values()), default=None)

    def verdicts(self) -> dict[TargetKey, bool]:
        return {k: m.verdict == "up" for k, m in self.machines.items()}

    def snapshot(self) -> list[dict[str, Any]]:
        return [m.snapshot() for m in self.machines.values()]


# --- I/O: probers ---------------------------------------------------------------------------


class Prober(Protocol):
    """Runs one probe; must return within ``timeout`` (plus scheduling slack)."""

    async def probe(self, target: Target, timeout: float) -> ProbeResult: ...


SocketFactory = Callable[[int, int], socket.socket]  # (family, type) -> non-blocking socket


def plain_socket(family: int, type_: int) -> socket.socket:
    s = socket.socket(family, type_)
    s.setblocking(False)
    return s


class DirectProber:
    """Probes the real's own address: TCP connect, HTTP/1.0 GET, UDP request/response.

    ``socket_factory`` makes each (non-blocking) socket; the daemon's creates them in the
    datapath's network namespace (a socket keeps the namespace it was made in)."""

    def __init__(self, socket_factory: SocketFactory = plain_socket) -> None:
        self.socket_factory = socket_factory

    async def probe(self, target: Target, timeout: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            detail = await asyncio.wait_for(self._run(target), timeout)
            return ProbeResult(True, loop.time() - t0, detail)
        except asyncio.TimeoutError:
            return ProbeResult(False, None, "timeout")
        except _Failed as e:
            return ProbeResult(False, loop.time() - t0, str(e))
        except OSError as e:
            detail = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
            return ProbeResult(False, loop.time() - t0, detail.lower())

    def endpoint(self, t: Target) -> tuple[str, int]:
        """Where the probe connects (a subclass may probe elsewhere: the VIP)."""
        return t.real_address, t.port

    def make_socket(self, t: Target, family: int, type_: int) -> socket.socket:
        """The probe's socket (a subclass may set options on it: SO_MARK)."""
        return self.socket_factory(family, type_)

    async def _run(self, t: Target) -> str:
        host_addr, port = self.endpoint(t)
        family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
        kind = t.spec.type
        loop = asyncio.get_running_loop()
        sock = self.make_socket(t, family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        try:
            addr = (host_addr, port)
            if kind == "udp":
                u = t.spec.udp_settings
                await loop.sock_connect(sock, addr)
                await loop.sock_sendall(sock, u.send.encode())
                data = await loop.sock_recv(sock, 65535)
                if u.expect is not None and u.expect.encode() not in data:
                    raise _Failed(f"reply without {u.expect!r} ({len(data)} bytes)")
                return f"reply ({len(data)} bytes)"
            await loop.sock_connect(sock, addr)
            if kind == "tcp":
                return "connected"
            h = t.spec.http_settings
            host = h.host or (f"[{host_addr}]" if family == socket.AF_INET6 else host_addr)
            req = f"GET {h.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lb-healthcheck\r\n" \
                  f"Connection: close\r\n\r\n"
            await loop.sock_sendall(sock, req.encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise _Failed(f"not an HTTP response: {line[:40]!r}")
            status = int(parts[1])
            if status not in h.expect_status:
                raise _Failed(f"status {status}, expected {'/'.join(map(str, h.expect_status))}")
            return f"status {status}"
        finally:
            sock.close()


class _Failed(Exception):
    """A probe that completed with the wrong answer."""


# --- the driver ------------------------------------------------------------------------------


class HealthSink(Protocol):
    """What the runner reports to (control.runtime.Runtime)."""

    def health_targets(self) -> tuple[int, Mapping[TargetKey, Target], Mapping[TargetKey, bool]]:
        """(version, targets, initial verdicts). version changes when targets may have."""
        ...

    def set_health(self, changes: Mapping[TargetKey, bool], reasons: Mapping[TargetKey, str]) -> None: ...


class HealthRunner:
    """Drives a :class:`Registry` with a real clock and a :class:`Prober`.

    ``observe(ProbeDone)`` is called for every result (metrics); verdict changes are
    handed to ``sink.set_health`` in a worker thread (it writes maps)."""

    def __init__(self, sink: HealthSink, prober: Prober, clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[ProbeDone], None] | None = None, tick: float = 0.25) -> None:
        self.sink = sink
        self.prober = prober
        self.clock = clock
        self.observe = observe
        self.tick = tick
        self.registry = Registry()
        self._version: int | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def poke(self) -> None:
        """Look at the targets again now (call from the event loop's thread)."""
        self._version = None
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._step()
                wake = self.registry.next_wakeup()
                delay = self.tick if wake is None else min(self.tick, max(0.0, wake - self.clock()))
                self._wake.clear()
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def _step(self) -> None:
        # in a thread: it takes the control plane's lock, which a long change may hold
        version, targets, initial = await asyncio.to_thread(self.sink.health_targets)
        now = self.clock()
        if version != self._version:
            self.registry.sync(targets, now, initial)
            self._version = version
        await self._handle(self.registry.poll(now))

    async def _handle(self, events: Iterable[Any]) -> None:
        changes: dict[TargetKey, bool] = {}
        reasons: dict[TargetKey, str] = {}
        for ev in events:
            if isinstance(ev, StartProbe):
                task = asyncio.ensure_future(self._probe(ev))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(ev, ProbeDone):
                if self.observe is not None:
                    self.observe(ev)
            elif isinstance(ev, Transition):
                changes[ev.key] = ev.new == "up"
                reasons[ev.key] = ev.reason
        if changes:
            await asyncio.to_thread(self.sink.set_health, changes, reasons)

    async def _probe(self, ev: StartProbe) -> None:
        try:
            result = await self.prober.probe(ev.target, ev.timeout)
        except Exception as e:  # noqa: BLE001 - a broken prober is a failed probe
            result = ProbeResult(False, None, f"prober error: {e}")
        events = self.registry.on_result(ev.target.key, ev.seq, result, self.clock())
        await self._handle(events)
        self._wake.set()


def with_spec(t: Target, **changes: Any) -> Target:
    """A copy of ``t`` with its spec fields changed (tests)."""
    return replace(t, spec=t.spec.model_copy(update=changes))
