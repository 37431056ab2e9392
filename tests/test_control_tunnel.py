"""Health probes through the tunnel (control/tunnel_probe.py, xdp/hc_encap.c) in the
network-namespace lab (netns/lab.py).

The probe socket lives in the balancer's namespace with SO_MARK = base + real id and
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
  restored -> back after ``rise`` successes. Every figure is measured and printed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from test_control_daemon import Daemon

from lb.config import config_to_dict

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

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
    from control.health import plain_socket
    from netns.ns import run_in_netns

    def make(fam: int, typ: int) -> socket.socket:
        return run_in_netns(ns, plain_socket, fam, typ)

    return make


def _target(vip: str, port: int, proto: str, real: str, real_id: int, kind: str, **spec):
    from control.health import Target
    from control.healthcheck import HealthCheck

    hc = HealthCheck(type=kind, interval=1, timeout=1, **spec)
    return Target(((vip, port, proto), real), hc, spec.get("port") or port, real_id, vip, port)


def _listener(ns: str, addr: str, port: int) -> socket.socket:
    """A TCP listener in ``ns`` (the kernel completes handshakes; nobody accepts)."""
    from netns.ns import run_in_netns

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        return s

    return run_in_netns(ns, make)


def test_prober_through_the_tunnel() -> None:
    from control.health import DirectProber
    from control.tunnel_probe import TunnelEncap, TunnelProber
    from netns.lab import VIP4, VIP6, Lab

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
    from netns.lab import VIP4

    cfg = config_to_dict(lab.config)
    for v in cfg["vips"]:
        if v["address"] == VIP4 and v["port"] == 80 and v["protocol"] == "tcp":
            v["healthcheck"] = {"type": "http", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE,
                                "fall": FALL}
    return cfg


def _in_ring(c, addr: str) -> bool:
    from netns.lab import VIP4

    for v in c.vips():
        if (v["address"], v["port"], v["protocol"]) == (VIP4, 80, "tcp"):
            return next(r for r in v["reals"] if r["address"] == addr)["effective_weight"] > 0
    raise AssertionError("VIP not found")


def _wait_ring(c, addr: str, want: bool, since: float, limit: float) -> float:
    while time.monotonic() - since < limit:
        if _in_ring(c, addr) == want:
            return time.monotonic() - since
        time.sleep(0.02)
    raise AssertionError(f"{addr} {'not back in' if want else 'still in'} the ring after {limit} s")


def test_daemon_takes_reals_out_and_back_through_the_tunnel(tmp_path) -> None:
    from control.health import DirectProber
    from netns.lab import VIP4, Lab, _wait_ready
    from netns.servers import http_requests

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
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    h = c.health()
                    if len(h) == 3 and all(x["state"] == "up" and x["totals"]["success"] >= 2 for x in h):
                        break
                    time.sleep(0.1)
                assert all(x["state"] == "up" for x in c.health()), c.health()

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
                _wait_ready(p, 20, log, f"the server on {victim.name}")
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
