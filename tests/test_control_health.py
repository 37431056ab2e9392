"""Health checks: the state machines on a fake clock, effective weights, the driver with
a scripted prober, and the direct prober's TCP/HTTP/UDP probes inside a namespace."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from control_helpers import make_config, real_addr, vip_dict

from control.datapaths import MemoryPort
from control.health_probing import (
    TRANSITIONS,
    DirectProber,
    HealthRunner,
    IllegalTransition,
    Machine,
    ProbeDone,
    ProbeResult,
    Registry,
    StartProbe,
    Target,
    Transition,
    plain_socket,
)
from control.plane import open_plane
from control.tables import Sizes, effective_weights
from lb.config import parse_config
from lb.healthcheck_config import HealthCheck

K0 = ("198.18.100.1", 80, "tcp")
OK = ProbeResult(True, 0.001, "connected")
FAIL = ProbeResult(False, 0.001, "connection refused")


def target(real="198.19.0.1", **spec) -> Target:
    hc = HealthCheck(**{"type": "tcp", "interval": 2.0, "timeout": 1.0, "rise": 2, "fall": 3, **spec})
    return Target((K0, real), hc, 80, 1, K0[0], 80)


def drive(m: Machine, now: float, result: ProbeResult | None) -> list:
    """One probe cycle at ``now``: start it, then report ``result`` (None: let it time out)."""
    events = m.poll(now)
    starts = [e for e in events if isinstance(e, StartProbe)]
    assert len(starts) == 1
    if result is None:
        return events + m.poll(now + m.target.spec.timeout)
    return events + m.on_result(starts[0].seq, result, now + 0.001)


def transitions(events):
    return [(e.old, e.new) for e in events if isinstance(e, Transition)]


def test_table_covers_every_state_and_outcome() -> None:
    assert set(TRANSITIONS) == {(v, ok) for v in ("up", "down") for ok in (True, False)}


def test_fall_then_rise_on_a_fake_clock() -> None:
    m = Machine(target(), next_due=0.0)
    t = 0.0
    for _ in range(2):
        assert transitions(drive(m, t, FAIL)) == []
        t += 2
    ev = drive(m, t, FAIL)  # the 3rd consecutive failure
    assert transitions(ev) == [("up", "down")]
    assert [e for e in ev if isinstance(e, Transition)][0].reason == \
        "3 consecutive failures (last: connection refused)"
    assert m.verdict == "down" and m.last_change == pytest.approx(t + 0.001)
    t += 2
    assert transitions(drive(m, t, OK)) == []
    t += 2
    assert transitions(drive(m, t, OK)) == [("down", "up")]  # rise = 2
    assert m.totals == {"success": 2, "failure": 3, "late": 0, "transitions": 2}


def test_a_result_of_the_other_kind_resets_the_count() -> None:
    m = Machine(target(fall=2), next_due=0.0)
    t = 0.0
    for r in (FAIL, OK, FAIL, OK, FAIL, OK):
        assert transitions(drive(m, t, r)) == []
        t += 2
    assert m.verdict == "up"
    assert transitions(drive(m, t, FAIL) + drive(m, t + 2, FAIL)) == [("up", "down")]


def test_timeouts_are_failures_and_late_results_are_ignored() -> None:
    m = Machine(target(fall=1, timeout=0.5), next_due=10.0)
    assert m.poll(9.9) == []
    (start,) = m.poll(10.0)
    assert isinstance(start, StartProbe) and start.timeout == 0.5
    assert m.poll(10.4) == []  # still in flight: no second probe
    ev = m.poll(10.5)
    assert transitions(ev) == [("up", "down")]
    assert [e.result.detail for e in ev if isinstance(e, ProbeDone)] == ["timeout"]
    assert m.on_result(start.seq, OK, 10.6) == []  # too late: ignored
    assert m.totals["late"] == 1 and m.verdict == "down"
    with pytest.raises(IllegalTransition):
        m.on_result(start.seq + 5, OK, 10.7)  # a probe that was never started


def test_probes_keep_their_cadence() -> None:
    m = Machine(target(interval=2.0, timeout=1.0), next_due=0.0)
    starts = []
    for now in [x / 10 for x in range(0, 101)]:
        for e in m.poll(now):
            if isinstance(e, StartProbe):
                starts.append(now)
                m.on_result(e.seq, OK, now + 0.05)
    assert starts == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert m.next_wakeup() == 12.0


def test_registry_sync() -> None:
    reg = Registry()
    a, b = target("198.19.0.1"), target("198.19.0.2")
    reg.sync({a.key: a, b.key: b}, 0.0, initial={b.key: False})
    assert reg.verdicts() == {a.key: True, b.key: False}  # b as last saved
    starts = [e for e in reg.poll(0.0) if isinstance(e, StartProbe)]
    assert len(starts) == 2  # probed at once
    m = reg.machines[a.key]
    m.on_result(starts[0].seq, FAIL, 0.1)
    assert m.failures == 1
    a2 = target("198.19.0.1", fall=5)
    reg.sync({a.key: a2}, 1.0)
    assert list(reg.machines) == [a.key] and m.failures == 0 and m.target.spec.fall == 5
    assert reg.on_result(b.key, 1, OK, 1.1) == []  # a target that went away


def hc_vip(reals, on_all_down="fail_open"):
    return parse_config({"settings": {"gateway_mac": "00:00:5e:00:53:01"}, "vips": [vip_dict(
        0, reals, healthcheck={"type": "tcp", "on_all_down": on_all_down})]}).vips[0]


def test_effective_weights() -> None:
    vip = hc_vip([(0, 1), (1, 2), (2, 0)])
    a, b = real_addr(0), real_addr(1)
    t, all_down = effective_weights(vip, drained={b}, down={a})
    assert [(x.drained, x.up) for x in t] == [(False, False), (True, True), (False, True)]
    assert all_down  # a (down) was the only real that would take traffic: fail open keeps it
    assert [x.effective for x in t] == [1, 0, 0]
    t, _ = effective_weights(vip, drained=(), down={a})
    assert [x.effective for x in t] == [0, 2, 0]
    # every candidate down: fail open keeps them (drained ones stay out), drop empties the ring
    t, all_down = effective_weights(vip, drained=(), down={a, b})
    assert all_down and [x.effective for x in t] == [1, 2, 0]
    t, all_down = effective_weights(hc_vip([(0, 1), (1, 2)], "drop"), drained=(), down={a, b})
    assert all_down and [x.effective for x in t] == [0, 0]
    # no health check: verdicts are ignored
    plain = parse_config({"settings": {"gateway_mac": "00:00:5e:00:53:01"},
                          "vips": [vip_dict(0, [0])]}).vips[0]
    t, all_down = effective_weights(plain, drained=(), down={a})
    assert [(x.effective, x.up) for x in t] == [(1, None)] and not all_down


# --- the driver, with a scripted prober and a real (short) clock ------------------------------------


class ScriptedProber:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls = 0

    async def probe(self, target: Target, timeout: float) -> ProbeResult:
        self.calls += 1
        await asyncio.sleep(0.001)
        if target.real_address in self.down:
            return ProbeResult(False, 0.001, "connection refused")
        return ProbeResult(True, 0.001, "connected")


def test_runner_takes_a_failing_real_out_and_back(caplog) -> None:
    caplog.set_level("INFO")
    hc = {"type": "tcp", "interval": 0.02, "timeout": 0.01, "rise": 2, "fall": 2}
    cfg = make_config([vip_dict(0, [0, 1, 2], healthcheck=hc)], ring_size=251)
    port = MemoryPort(Sizes.of(cfg.settings))
    ctl = open_plane(port, None, cfg)
    prober = ScriptedProber()
    seen: list[ProbeDone] = []
    runner = HealthRunner(ctl.runtime, prober, observe=seen.append, tick=0.01)
    bad = real_addr(1)
    bad_id = ctl.core.state.ids.reals[bad]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(runner.run(stop))

        async def until(cond, timeout=5.0):
            t0 = asyncio.get_running_loop().time()
            while not cond():
                assert asyncio.get_running_loop().time() - t0 < timeout, "timed out"
                await asyncio.sleep(0.01)

        await until(lambda: prober.calls >= 6)
        assert bad_id in port.ring(0)
        prober.down.add(bad)
        await until(lambda: bad_id not in port.ring(0))
        assert ctl.views.vip_view(K0)["reals"][1]["healthy"] is False
        assert port.reals[bad_id]["family"] != 0  # the real entry stays: established flows go on
        prober.down.clear()
        await until(lambda: bad_id in port.ring(0))
        # every real down: fail open keeps all of them
        prober.down.update(real_addr(i) for i in range(3))
        await until(lambda: K0 in ctl.core.tables.all_down)
        assert set(port.ring(0)) == {1, 2, 3}
        stop.set()
        await task

    asyncio.run(scenario())
    assert ctl.core.counters["health_transitions"] >= 5
    assert "198.19.0.2 is down: 2 consecutive failures" in caplog.text
    assert "all reals of 198.18.100.1:80/tcp are down: failing open" in caplog.text
    assert any(not e.result.ok for e in seen) and any(e.result.ok for e in seen)


def test_settings_listeners_hear_of_changed_settings_only(caplog) -> None:
    """Controller.on_settings (the tunnel prober follows settings.encap / gue through it):
    called once per change of the settings, not for other changes nor a full reconcile,
    and a failing listener does not undo the change."""
    from lb.config import config_to_dict

    cfg = make_config([vip_dict(0, [0, 1])])
    port = MemoryPort(Sizes.of(cfg.settings))
    ctl = open_plane(port, None, cfg)
    heard: list = []
    ctl.core.on_settings.append(heard.append)
    data = config_to_dict(cfg)
    data["vips"][0]["reals"].pop()
    ctl.commands.replace_config(data)  # VIPs only
    ctl.runtime.reconcile()
    assert heard == []
    data["settings"].update(encap="gue", gue={"port": 7000, "source_v4": "198.18.0.254"})
    ctl.commands.replace_config(data)
    assert [(s.encap, s.gue.port) for s in heard] == [("gue", 7000)]
    assert heard[0] is ctl.core.state.config.settings
    ctl.commands.add_real(K0, {"address": real_addr(1)})
    ctl.runtime.reconcile()
    assert len(heard) == 1

    def broken(_settings) -> None:
        raise OSError("map update failed")

    ctl.core.on_settings.insert(0, broken)
    data["settings"]["encap"] = "ipip"
    gen = ctl.commands.replace_config(data).generation
    assert ctl.core.generation == gen and ctl.core.state.config.settings.encap == "ipip"
    assert [s.encap for s in heard] == ["gue", "ipip"]
    assert "map update failed" in caplog.text


def test_all_down_with_drop_empties_the_ring() -> None:
    hc = {"type": "tcp", "on_all_down": "drop"}
    cfg = make_config([vip_dict(0, [0, 1], healthcheck=hc)])
    port = MemoryPort(Sizes.of(cfg.settings))
    ctl = open_plane(port, None, cfg)
    keys = list(ctl.core.targets(ctl.core.state))
    ctl.runtime.set_health({keys[0]: False})
    assert set(port.ring(0)) == {2}
    ctl.runtime.set_health({keys[1]: False})
    assert set(port.ring(0)) == {0}  # the datapath drops (drop_no_real)
    ctl.runtime.set_health({keys[0]: True})
    assert set(port.ring(0)) == {1}


def test_a_real_down_for_one_vip_moves_that_vips_udp_flows_only() -> None:
    """The down set is per (VIP, real): a real down for VIP A and up for VIP B moves A's
    UDP flows pinned to it (re-hashed onto A's healthy ring, entry rewritten) and leaves
    B's. Write order: a pair joins the down set, and the real gets its REAL_F_DOWN hint,
    after the rings moved off it; a pair leaves the set, and a real up for every VIP loses
    its hint, before a ring names it again."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import raw

    from control.datapaths import UserspacePort
    from control.reconcile import WriteDownWord, WriteReal, WriteRing
    from lb import constants as C
    from lb.datapath_tables import down_bit

    hc = {"type": "udp", "interval": 1.0, "timeout": 0.5}
    cfg = make_config([vip_dict(0, [0, 1], port=53, protocol="udp", healthcheck=hc),
                       vip_dict(1, [1, 2], port=53, protocol="udp", healthcheck=hc)])
    port = UserspacePort(Sizes.of(cfg.settings))
    ctl = open_plane(port, None, cfg)
    k_a, k_b = ctl.core.state.config.vips[0].key, ctl.core.state.config.vips[1].key
    shared = real_addr(1)
    rid = ctl.core.state.ids.reals[shared]

    def send(key, sport: int, now: int):
        f = raw(Ether() / IP(src="198.18.0.10", dst=key[0]) / UDP(sport=sport, dport=53) / b"q")
        r = port.dp.process_frames([f], now=now)
        return int(r.real_ids[0]), {n: int(r.stats[i]) for i, n in enumerate(C.STATS) if r.stats[i]}

    def down_for(key) -> bool:
        word, bit = down_bit(ctl.core.state.ids.vips[key], rid, ctl.core.state.config.settings.max_reals)
        return bool(int(port.down.reshape(-1)[word]) & bit)

    def kinds() -> list[type]:
        return [type(op) for op in port.writes]

    hit = {"rx_packets": 1, "lru_hit": 1, "tx_encap": 1}
    migrated = {"rx_packets": 1, "lru_miss": 1, "down_real_migrated": 1, "tx_encap": 1}
    # a flow of each VIP pinned to the shared real
    sa = next(p for p in range(1000, 1200) if send(k_a, p, 1)[0] == rid)
    sb = next(p for p in range(1000, 1200) if send(k_b, p, 1)[0] == rid)
    flagged = lambda: bool(port.reals[rid]["flags"] & C.REAL_F_DOWN)  # noqa: E731

    # down for A only: A's flow moves, B's stays
    port.writes.clear()
    ctl.runtime.set_health({(k_a, shared): False})
    assert flagged() and down_for(k_a) and not down_for(k_b)
    assert rid not in port.ring(0) and rid in port.ring(1)
    last_ring = max(i for i, k in enumerate(kinds()) if k is WriteRing)
    assert kinds().index(WriteDownWord) > last_ring and kinds().index(WriteReal) > kinds().index(WriteDownWord)
    moved_a, counts = send(k_a, sa, 2)
    assert moved_a != rid and counts == migrated
    assert send(k_a, sa, 3) == (moved_a, hit)  # entry rewritten
    assert send(k_b, sb, 3) == (rid, hit)

    # down for B too: B's flow moves now (the hint was already set: one down-set write)
    port.writes.clear()
    ctl.runtime.set_health({(k_b, shared): False})
    assert down_for(k_b) and WriteReal not in kinds()
    assert kinds().index(WriteDownWord) > max(i for i, k in enumerate(kinds()) if k is WriteRing)
    moved_b, counts = send(k_b, sb, 4)
    assert moved_b != rid and counts == migrated

    # up for A again: its bit goes before A's ring names the real; still down for B
    port.writes.clear()
    ctl.runtime.set_health({(k_a, shared): True})
    assert flagged() and not down_for(k_a) and down_for(k_b) and rid in port.ring(0)
    assert WriteReal not in kinds() and kinds().index(WriteDownWord) < kinds().index(WriteRing)

    # up for B: the bit and the hint go before B's ring names it; no flow moves back
    port.writes.clear()
    ctl.runtime.set_health({(k_b, shared): True})
    assert not flagged() and not down_for(k_b) and rid in port.ring(1)
    assert max(kinds().index(WriteDownWord), kinds().index(WriteReal)) < kinds().index(WriteRing)
    assert send(k_a, sa, 5) == (moved_a, hit) and send(k_b, sb, 5) == (moved_b, hit)


# --- the direct prober, for real, inside a namespace of our own --------------------------------------

needs_root = pytest.mark.root  # through conftest's guard: skipped as a user, a failure under CI


@pytest.fixture
def ns():
    from netns.ns import Netns

    with Netns("lbc") as n:
        n.exec(["ip", "link", "set", "lo", "up"])
        yield n


def _serve_in(ns, kind: str, reply: bytes) -> tuple[int, threading.Event]:
    """A one-thread server inside ``ns`` on 127.0.0.1; returns (port, stop)."""
    from lb.kernel.netns import run_in_netns

    typ = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    sock = run_in_netns(ns, socket.socket, socket.AF_INET, typ)
    sock.bind(("127.0.0.1", 0))
    if kind != "udp":
        sock.listen(8)
    sock.settimeout(0.1)
    stop = threading.Event()

    def loop() -> None:
        with sock:
            while not stop.is_set():
                try:
                    if kind == "udp":
                        data, addr = sock.recvfrom(2048)
                        if reply:
                            sock.sendto(reply + data, addr)
                        continue
                    conn, _ = sock.accept()
                except (TimeoutError, socket.timeout):
                    continue
                with conn:
                    if kind == "http":
                        conn.settimeout(1)
                        conn.recv(4096)
                        conn.sendall(reply)

    threading.Thread(target=loop, daemon=True).start()
    return sock.getsockname()[1], stop


@needs_root
@pytest.mark.netns
def test_direct_prober_tcp_http_udp(ns) -> None:
    from lb.kernel.netns import run_in_netns

    prober = DirectProber(lambda fam, typ: run_in_netns(ns, plain_socket, fam, typ))
    stops = []

    def tgt(port: int, **spec) -> Target:
        hc = HealthCheck(**{"interval": 2.0, "timeout": 0.5, **spec})
        return Target((K0, "127.0.0.1"), hc, port, 1, K0[0], 80)

    def run(t: Target) -> ProbeResult:
        return asyncio.run(prober.probe(t, t.spec.timeout))

    try:
        tcp, s = _serve_in(ns, "tcp", b"")
        stops.append(s)
        r = run(tgt(tcp, type="tcp"))
        assert r.ok and r.detail == "connected" and 0 < r.latency < 0.5
        r = run(tgt(1, type="tcp"))  # nothing listens: refused
        assert not r.ok and r.detail == "connection refused"

        ok, s = _serve_in(ns, "http", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        stops.append(s)
        bad, s = _serve_in(ns, "http", b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        stops.append(s)
        assert run(tgt(ok, type="http", http={"path": "/healthz"})).detail == "status 200"
        r = run(tgt(bad, type="http"))
        assert not r.ok and r.detail == "status 503, expected 200"
        assert run(tgt(bad, type="http", http={"expect_status": [200, 503]})).ok

        echo, s = _serve_in(ns, "udp", b"pong:")
        stops.append(s)
        assert run(tgt(echo, type="udp", udp={"send": "ping", "expect": "pong"})).ok
        r = run(tgt(echo, type="udp", udp={"send": "ping", "expect": "nope"}))
        assert not r.ok and "without 'nope'" in r.detail
        silent, s = _serve_in(ns, "udp", b"")
        stops.append(s)
        r = run(tgt(silent, type="udp", timeout=0.2))
        assert not r.ok and r.detail == "timeout" and r.latency is None
    finally:
        for s in stops:
            s.set()
