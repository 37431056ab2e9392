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
import socket
import subprocess

import pytest

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
