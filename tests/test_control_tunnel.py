"""Health probes through the tunnel (control/tunnel_probe.py, xdp/hc_encap.c) in the
network-namespace lab (netns/lab.py).

Part 1, BPF_PROG_TEST_RUN: hc_encap_tc on scapy-built probe packets (``skb->mark`` set in
the context) writes the exact GUE (and IPIP) headers of docs/datapath.md "Outputs" for
every family pair, follows :meth:`TunnelEncap.set_settings`, and the reals' decap program
(lb/decap_loader.py) restores the probe byte for byte.

Part 2, the lab. The probe socket lives in the balancer's namespace with SO_MARK = base + real id and
connects to the VIP; the tc egress program encapsulates it towards that real as the XDP
datapath would; the real decapsulates, answers from the VIP straight back to the
balancer's address (DSR), and the balancer's XDP program passes the reply (not a VIP
destination). The lab's balancer has no default route (it never needs one for the
datapath), so each test gives it a default route via the router, as a balancer host has.

* prober level: TCP, HTTP and UDP probes of every real through the tunnel, IPv4 (IPIP)
  and IPv6 (IP6IP6); a real whose VIP is gone from its loopback fails through the tunnel
  while a direct probe of its own address still succeeds;
* daemon level (``lbctl serve`` adopting the lab's pinned maps, as
  tests/test_control_lab.py): a real's server stopped -> out of the ring within
  interval x fall (+ timeout), new connections only to the others after that; the VIP
  removed from a real's loopback -> out of the ring although its own address answers;
  restored -> back after ``rise`` successes. Every figure is measured and printed;
* the same daemon with ``encap: gue``: reals up through GUE probes (the reals' decap
  ``gue`` counter grows, ``v4_in_v4`` does not), a stopped server marked down.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from fixtures import gue_sport
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from test_control_daemon import Daemon

from lb.kernel.testrun import test_run
from lb.config import config_to_dict, parse_config

pytestmark = [pytest.mark.root, pytest.mark.bpf]

INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.4, 2, 3


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


def _default_routes(lb) -> None:
    """The balancer's default route via the router, as on a real balancer host (the lab's
    balancer has none: its datapath never needs one). Tunnel probes to the VIPs take it, and
    so do direct probes of the reals' own addresses."""
    _ip(lb.ns, "route", "add", "default", "via", lb.gw4)
    _ip(lb.ns, "-6", "route", "add", "default", "via", lb.gw6)


def _factory(ns: str):
    from control.health_probing import plain_socket
    from lb.kernel.netns import run_in_netns

    def make(fam: int, typ: int) -> socket.socket:
        return run_in_netns(ns, plain_socket, fam, typ)

    return make


def _target(vip: str, port: int, proto: str, real: str, real_id: int, kind: str, **spec):
    from control.health_probing import Target
    from lb.healthcheck_config import HealthCheck

    hc = HealthCheck(type=kind, interval=1, timeout=1, **spec)
    return Target(((vip, port, proto), real), hc, spec.get("port") or port, real_id, vip, port)


def _listener(ns: str, addr: str, port: int) -> socket.socket:
    """A TCP listener in ``ns`` (the kernel completes handshakes; nobody accepts)."""
    from lb.kernel.netns import run_in_netns

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        return s

    return run_in_netns(ns, make)


# ---- part 1: BPF_PROG_TEST_RUN ----------------------------------------------------------

MAC_LB, MAC_GW = "02:00:00:00:00:01", "02:00:00:00:00:fe"
CLIENT = {4: "198.18.0.7", 6: "2001:db8::a:b0c"}  # the balancer's address: the probe's source
VIP = {4: "198.18.110.1", 6: "2001:db8:110::1"}
REAL = {4: "198.19.1.3", 6: "2001:db8:2::3"}
REAL_ID = {4: 3, 6: 4}
GUE_SRC = {4: "198.18.0.254", 6: "2001:db8:fffe::254"}
GUE_PORT = 7000
SPORT, TOS = 40001, 0x28
TC_ACT_OK, TC_ACT_SHOT = 0, 2


def _settings(encap: str, port: int = GUE_PORT):
    return parse_config({"settings": {"gateway_mac": "00:00:5e:00:53:01", "encap": encap,
                                      "gue": {"port": port, "source_v4": GUE_SRC[4], "source_v6": GUE_SRC[6]}},
                         "vips": []}).settings


def _probe(client_v: int) -> tuple[bytes, bytes]:
    """(frame, its IP packet): a TCP SYN of a probe socket, as the stack hands it to tc."""
    l3 = IP(src=CLIENT[4], dst=VIP[4], tos=TOS) if client_v == 4 else IPv6(src=CLIENT[6], dst=VIP[6], tc=TOS)
    inner = bytes(l3 / TCP(sport=SPORT, dport=80, flags="S", seq=12345))
    return bytes(Ether(src=MAC_LB, dst=MAC_GW, type=0x800 if client_v == 4 else 0x86DD)) + inner, inner


def _expected_gue(client_v: int, real_v: int, inner: bytes) -> bytes:
    """docs/datapath.md "Outputs", GUE, rebuilt with scapy: the L2 header kept (ethertype of
    the outer family), outer IP from the configured source, Katran's UDP source port (from
    the client address and the source port), the UDP checksum over the whole datagram."""
    udp = UDP(sport=gue_sport(CLIENT[client_v], SPORT, REAL[real_v]), dport=GUE_PORT, len=len(inner) + 8)
    if real_v == 4:
        outer = IP(src=GUE_SRC[4], dst=REAL[4], tos=TOS, id=0, flags=0, ttl=64, proto=17)
    else:
        outer = IPv6(src=GUE_SRC[6], dst=REAL[6], tc=TOS, fl=0, hlim=64, nh=17)
    return bytes(Ether(src=MAC_LB, dst=MAC_GW) / outer / udp / Raw(inner))


@pytest.fixture(scope="module")
def hc_encap():
    from control.tunnel_probe import TunnelEncap

    with TunnelEncap(max_reals=64) as enc:
        for v in (4, 6):
            enc.set_real(REAL_ID[v], REAL[v])
        yield enc


@pytest.fixture(scope="module")
def decaps():
    """The reals' decap program, tc and XDP entries, listening on GUE_PORT."""
    from lb.decap_loader import DecapProgram

    progs = [DecapProgram(mode, gue_port=GUE_PORT) for mode in ("tc", "xdp")]
    try:
        yield progs
    finally:
        for p in progs:
            p.close()


def _run(enc, frame: bytes, real_v: int) -> tuple[int, bytes]:
    r = test_run(enc.prog_fd, frame, mark=enc.mark(REAL_ID[real_v]))
    return r.action, r.output


@pytest.mark.parametrize("client_v,real_v", [(4, 4), (4, 6), (6, 6), (6, 4)])
def test_gue_probe_bytes_and_decap(hc_encap, decaps, client_v, real_v) -> None:
    from lb import layout

    assert ctypes.sizeof(hc_encap._ctl.Leaf) == layout.CTL.itemsize  # hc_ctl holds a ctl entry
    hc_encap.set_settings(_settings("gue"))
    frame, inner = _probe(client_v)
    before = hc_encap.read_stats()
    action, out = _run(hc_encap, frame, real_v)
    assert action == TC_ACT_OK
    assert out == _expected_gue(client_v, real_v, inner), Ether(out).show2(dump=True)
    after = hc_encap.read_stats()
    assert after[f"encap_v{real_v}"] == before[f"encap_v{real_v}"] + 1
    # the real's decap program (tc and XDP entries) hands the probe back unchanged
    for dec in decaps:
        dec.reset_stats()
        r = test_run(dec.prog_fd, out, out_size=len(out) + 64)
        assert r.output == frame, (dec.mode, Ether(r.output).show2(dump=True))
        assert dec.read_stats()["gue"] == 1


def test_settings_switch_the_probe_encapsulation(hc_encap) -> None:
    """IPIP <-> GUE follows set_settings (a write only when something changed); with IPIP an
    IPv6 probe for an IPv4 real is dropped, as the datapath cannot send it."""
    assert hc_encap.set_settings(_settings("ipip")) is True  # never set, or GUE before
    same = _settings("ipip")
    assert hc_encap.set_settings(same) is False  # equal content: no write
    assert hc_encap.set_settings(same) is False  # same object: not even compared
    frame, inner = _probe(4)
    action, out = _run(hc_encap, frame, 4)
    assert action == TC_ACT_OK
    assert out[12:14] == b"\x08\x00" and out[14 + 9] == 4 and out[34:] == inner  # IPIP
    before = hc_encap.read_stats()["drop_no_real"]
    assert _run(hc_encap, _probe(6)[0], 4)[0] == TC_ACT_SHOT
    assert hc_encap.read_stats()["drop_no_real"] == before + 1

    assert hc_encap.set_settings(_settings("gue")) is True
    assert _run(hc_encap, frame, 4)[1] == _expected_gue(4, 4, inner)
    assert hc_encap.set_settings(_settings("gue", port=GUE_PORT + 1)) is True
    out = _run(hc_encap, frame, 4)[1]
    assert UDP(out[34:42]).dport == GUE_PORT + 1
    assert hc_encap.set_settings(_settings("ipip")) is True
    assert _run(hc_encap, frame, 4)[1][14 + 9] == 4


# ---- part 2: the lab ----------------------------------------------------------------------

@pytest.mark.netns
@pytest.mark.slow
def test_prober_through_the_tunnel() -> None:
    from control.health_probing import DirectProber
    from control.tunnel_probe import TunnelEncap, TunnelProber
    from netns.lab import Lab
    from netns.topology import VIP4, VIP6

    with Lab(reals=3, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        _default_routes(lb)
        reals = lab.reals()
        with TunnelEncap(max_reals=64) as enc:
            enc.attach(lb.ifname, lb.ns)
            tunnel = TunnelProber(enc, _factory(lb.ns))
            direct = DirectProber(_factory(lb.ns))

            async def run_all(targets):
                return await asyncio.gather(*(tunnel.probe(t, 1.0) for t in targets))

            targets = []
            for i, h in enumerate(reals):
                for vip, real in ((VIP4, h.real4), (VIP6, h.real6)):
                    targets += [_target(vip, 80, "tcp", real, 2 * i + 1 + (vip == VIP6), "tcp"),
                                _target(vip, 80, "tcp", real, 2 * i + 1 + (vip == VIP6), "http"),
                                _target(vip, 7, "udp", real, 2 * i + 1 + (vip == VIP6), "udp",
                                        udp={"send": "hc", "expect": f"{h.name} hc"})]
            before = lab.balancer_stats()
            results = asyncio.run(run_all(targets))
            for t, r in zip(targets, results, strict=True):
                assert r.ok, (t.spec.type, t.vip_address, t.real_address, r)
            stats = enc.read_stats()
            print(f"MEASURED tunnel probes: {len(results)} ok, latencies ms "
                  f"{sorted(round(r.latency * 1000, 2) for r in results)}; tc {stats}")
            assert stats["encap_v4"] > 0 and stats["encap_v6"] > 0
            assert stats["drop_no_real"] == stats["drop_malformed"] == stats["drop_failed"] == 0
            # the UDP replies name the real the mark chose: the tunnel went to that real
            after = lab.balancer_stats()
            # replies reached the balancer's own address: passed by its XDP program, never
            # encapsulated by it
            assert after["tx_encap"] == before["tx_encap"]
            assert after["pass_not_vip"] > before["pass_not_vip"]

            # a real without its VIP on lo: tunnel fails, its own address still answers
            h = reals[1]
            lst = _listener(h.ns, h.real4, 80)
            try:
                t_tun = _target(VIP4, 80, "tcp", h.real4, 3, "tcp")
                t_dir = _target(VIP4, 80, "tcp", h.real4, 3, "tcp")
                assert asyncio.run(direct.probe(t_dir, 1.0)).ok
                _ip(h.ns, "addr", "del", f"{VIP4}/32", "dev", "lo")
                try:
                    r_tun = asyncio.run(tunnel.probe(t_tun, 1.0))
                    r_dir = asyncio.run(direct.probe(t_dir, 1.0))
                    print(f"MEASURED VIP gone from {h.name}'s lo: tunnel probe {r_tun}, direct probe {r_dir}")
                    assert not r_tun.ok and r_dir.ok
                finally:
                    _ip(h.ns, "addr", "add", f"{VIP4}/32", "dev", "lo")
                assert asyncio.run(tunnel.probe(t_tun, 1.0)).ok
            finally:
                lst.close()


def _hc_config(lab) -> dict:
    from netns.topology import VIP4

    cfg = config_to_dict(lab.config)
    for v in cfg["vips"]:
        if v["address"] == VIP4 and v["port"] == 80 and v["protocol"] == "tcp":
            v["healthcheck"] = {"type": "http", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE,
                                "fall": FALL}
    return cfg


def _in_ring(c, addr: str) -> bool:
    from netns.topology import VIP4

    for v in c.vips():
        if (v["address"], v["port"], v["protocol"]) == (VIP4, 80, "tcp"):
            return next(r for r in v["reals"] if r["address"] == addr)["effective_weight"] > 0
    raise AssertionError("VIP not found")


def _wait_all_up(c, n: int, limit: float = 10) -> None:
    """Until the n health-checked reals are up with two successes each (at most limit s);
    then asserts they are all up."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        h = c.health()
        if len(h) == n and all(x["state"] == "up" and x["totals"]["success"] >= 2 for x in h):
            break
        time.sleep(0.1)
    assert all(x["state"] == "up" for x in c.health()), c.health()


def _wait_ring(c, addr: str, want: bool, since: float, limit: float) -> float:
    while time.monotonic() - since < limit:
        if _in_ring(c, addr) == want:
            return time.monotonic() - since
        time.sleep(0.02)
    raise AssertionError(f"{addr} {'not back in' if want else 'still in'} the ring after {limit} s")


@pytest.mark.netns
@pytest.mark.slow
def test_daemon_takes_reals_out_and_back_through_the_tunnel(tmp_path) -> None:
    from control.health_probing import DirectProber
    from netns.lab import Lab
    from netns.processes import wait_ready
    from netns.servers import http_requests
    from netns.topology import VIP4

    with Lab(reals=3, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        _default_routes(lb)
        pin_dir = lab.state["pin_dirs"][lb.name]
        d = Daemon(tmp_path, "--pin-dir", pin_dir, "--netns", lb.ns, interface=lb.ifname, datapath="xdp",
                   config=_hc_config(lab))
        client = lab.client()
        stop = threading.Event()
        batches: list[tuple[float, float, list]] = []  # (start, end, results)
        t = None
        figures: dict[str, float] = {}
        try:
            d.start()
            assert "health probes through the tunnel" in d.log.read_text()
            with d.client() as c:
                _wait_all_up(c, 3)

                def traffic() -> None:
                    while not stop.is_set():
                        t0 = time.monotonic()
                        res = http_requests(client.ns, VIP4, n=20, concurrency=4)
                        batches.append((t0, time.monotonic(), res))

                t = threading.Thread(target=traffic)
                t.start()
                time.sleep(0.5)

                # 1. a real's server stops: out of the ring within interval x fall (+ timeout)
                victim = lab.reals()[2]
                proc = lab._procs[f"server-{victim.name}"]
                t_stop = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
                figures["stop_to_out"] = _wait_ring(c, victim.real4, False, t_stop, 10)
                t_out = time.monotonic()
                time.sleep(1.5)
                served = [r for (s, _, res) in batches if s > t_out for r in res]
                figures["requests_after_out"] = len(served)
                assert served and all(r.real is not None for r in served), [r for r in served if r.real is None][:3]
                assert victim.name not in {r.real for r in served}
                window = [r for (s, e, res) in batches if e > t_stop and s <= t_out for r in res]
                figures["failed_in_detection_window"] = sum(r.real is None for r in window)
                # back: server restarted -> in the ring after `rise` successes
                log = os.path.join(lab.log_dir, f"{victim.name}.log")
                p = lab._spawn(f"server-{victim.name}", victim.ns, lab._server_argv(victim), log)
                wait_ready(p, 20, log, f"the server on {victim.name}")
                t_start = time.monotonic()
                figures["restart_to_in"] = _wait_ring(c, victim.real4, True, t_start, 10)

                # 2. the VIP leaves a real's loopback: its own address still answers, the
                # tunnel probe does not -> out of the ring
                h2 = lab.reals()[1]
                lst = _listener(h2.ns, h2.real4, 80)
                try:
                    t_dir = _target(VIP4, 80, "tcp", h2.real4, 1, "tcp")
                    t_del = time.monotonic()
                    _ip(h2.ns, "addr", "del", f"{VIP4}/32", "dev", "lo")
                    figures["vip_gone_to_out"] = _wait_ring(c, h2.real4, False, t_del, 10)
                    t_out2 = time.monotonic()
                    row = next(x for x in c.health() if x["real"] == h2.real4)
                    direct = asyncio.run(DirectProber(_factory(lb.ns)).probe(t_dir, 1.0))
                    print(f"MEASURED VIP gone from {h2.name}'s lo: daemon's tunnel probe {row['last_result']}, "
                          f"state {row['state']}; direct probe of {h2.real4}:80 {direct}")
                    assert row["state"] == "down" and not row["last_result"]["ok"]
                    assert direct.ok
                    t_add = time.monotonic()
                    _ip(h2.ns, "addr", "add", f"{VIP4}/32", "dev", "lo")
                    figures["vip_back_to_in"] = _wait_ring(c, h2.real4, True, t_add, 10)
                finally:
                    lst.close()
                time.sleep(1.0)
                stop.set()
                t.join(timeout=60)
                last = [r for (s, _, res) in batches if s > t_add + figures["vip_back_to_in"] for r in res]
                assert {r.real for r in last} == {h.name for h in lab.reals()}, Counter(r.real for r in last)
                assert all(r.real is not None for r in last)
        finally:
            stop.set()
            if t is not None:
                t.join(timeout=60)
            d.stop()
        everything = [r for (_, _, res) in batches for r in res]
        bound_out = INTERVAL * FALL + TIMEOUT
        bound_in = INTERVAL * RISE + TIMEOUT
        print(f"MEASURED tunnel health (interval {INTERVAL} s, timeout {TIMEOUT} s, fall {FALL}, rise {RISE}): "
              f"server stopped -> out of the ring {figures['stop_to_out']:.2f} s (bound {bound_out:.2f} s); "
              f"restarted -> back {figures['restart_to_in']:.2f} s; VIP removed from lo -> out "
              f"{figures['vip_gone_to_out']:.2f} s; VIP restored -> back {figures['vip_back_to_in']:.2f} s "
              f"(bound {bound_in:.2f} s); {len(everything)} requests, "
              f"{sum(r.real is None for r in everything)} failed, all in the detection windows "
              f"({figures['failed_in_detection_window']} while the stopped server was still in the ring); {figures['requests_after_out']} requests after "
              f"removal, 0 failed, none to the stopped real")
        assert figures["stop_to_out"] <= bound_out + 0.5
        assert figures["vip_gone_to_out"] <= bound_out + 0.5
        assert figures["restart_to_in"] <= bound_in + 0.5
        assert figures["vip_back_to_in"] <= bound_in + 0.5
        # a request fails only if it overlapped a detection window (event -> out of the ring)
        outside = [r for (st, e, res) in batches for r in res if r.real is None
                   and not (e > t_stop and st <= t_out) and not (e > t_del and st <= t_out2)]
        assert not outside, outside[:3]


@pytest.mark.netns
@pytest.mark.slow
def test_daemon_probes_through_gue(tmp_path) -> None:
    """``encap: gue``: the daemon's probes are GUE from the start (the reals' decap program
    counts them as ``gue``, no IPIP at all) and bring the reals up; a stopped server goes
    down; switching the running daemon to ``ipip`` switches the probes too."""
    from netns.lab import Lab

    with Lab(reals=2, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        _default_routes(lb)
        cfg = _hc_config(lab)
        cfg["settings"].update(encap="gue", gue={"source_v4": GUE_SRC[4], "source_v6": GUE_SRC[6]})
        d = Daemon(tmp_path, "--pin-dir", lab.state["pin_dirs"][lb.name], "--netns", lb.ns,
                   interface=lb.ifname, datapath="xdp", config=cfg)
        d0 = lab.decap_stats()
        try:
            t_start = time.monotonic()
            d.start()
            assert "encap gue" in d.log.read_text()
            with d.client() as c:
                _wait_all_up(c, 2)
                t_up = time.monotonic() - t_start
                d1 = lab.decap_stats()
                assert d1["gue"] > d0["gue"]
                assert d1["v4_in_v4"] == d0["v4_in_v4"] and d1["v6_in_v4"] == d0["v6_in_v4"]

                victim = lab.reals()[1]
                proc = lab._procs[f"server-{victim.name}"]
                t_stop = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
                stop_to_out = _wait_ring(c, victim.real4, False, t_stop, 10)
                row = next(x for x in c.health() if x["real"] == victim.real4)
                assert row["state"] == "down" and not row["last_result"]["ok"]
                assert _in_ring(c, lab.reals()[0].real4)
                d2 = lab.decap_stats()
                assert d2["gue"] > d1["gue"] and d2["v4_in_v4"] == d0["v4_in_v4"]

                # settings changed at run time: the probes follow (and the live real stays up)
                cfg["settings"]["encap"] = "ipip"
                c.put_config(cfg)
                time.sleep(INTERVAL * 2 + TIMEOUT)  # probes under way at the switch finish
                d3 = lab.decap_stats()
                time.sleep(INTERVAL * 3)
                d4 = lab.decap_stats()
                assert d4["v4_in_v4"] > d3["v4_in_v4"] and d4["gue"] == d3["gue"], (d3, d4)
                assert _in_ring(c, lab.reals()[0].real4)
        finally:
            d.stop()
        print(f"MEASURED tunnel health with GUE: up after {t_up:.2f} s from start "
              f"({d1['gue'] - d0['gue']} GUE probe packets decapsulated, 0 IPIP); server stopped -> "
              f"out of the ring {stop_to_out:.2f} s (bound {INTERVAL * FALL + TIMEOUT:.2f} s); after "
              f"the switch to ipip {d4['v4_in_v4'] - d3['v4_in_v4']} IPIP and 0 GUE probe packets "
              f"in {INTERVAL * 3:.1f} s")
        assert stop_to_out <= INTERVAL * FALL + TIMEOUT + 0.5
