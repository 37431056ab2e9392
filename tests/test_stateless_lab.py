"""Stateless VIPs in the namespace lab, real TCP: a stateless and a default VIP side by
side (same reals, same servers), N long-lived connections on each, every one sending a
request every 100 ms, through ``lbctl serve`` on the XDP datapath and the reals' decap
with its second chance. Then

* (a) a real is added, under a SYN flood of spoofed sources at the stateless VIP;
* (b) weights change;
* (c) the balancer restarts with its maps wiped (daemon SIGKILLed, pins removed);
* (d) in the fleet lab (two balancers, etcd, ECMP), one balancer dies after a ring change.

The stateless VIP must break no connection in any of them; the default VIP's counts are
printed beside (it breaks some in (c) and (d): its connection table is gone, the ring
sends a moved flow to a real that has no connection for it).
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from test_control_daemon import Daemon

from lb.config import config_to_dict, parse_config

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

CONNS = int(os.environ.get("LB_STATELESS_CONNS", "200"))  # per VIP
SETTLE = 2.0  # seconds of traffic after each change before counting
FLOOD = int(os.environ.get("LB_STATELESS_FLOOD", "1000000"))  # spoofed SYNs during (a)
DEFAULT_PORT, STATELESS_PORT = 80, 81
R = ("198.18.101.2", "198.18.102.2", "198.18.103.2")  # r1, r2, r3's link addresses


def _config(reals: dict[str, int]) -> dict:
    from netns.topology import VIP4

    rs = [{"address": a, "weight": w} for a, w in reals.items()]
    return {"settings": {"gateway_mac": "02:00:00:00:00:01", "encap": "gue",
                         "gue": {"source_v4": "198.18.0.254", "source_v6": "2001:db8:fffe::254"},
                         "conn_table_size": 65536, "second_chance_s": 600},
            "vips": [{"address": VIP4, "port": DEFAULT_PORT, "protocol": "tcp", "reals": rs},
                     {"address": VIP4, "port": STATELESS_PORT, "protocol": "tcp", "flags": ["stateless"],
                      "reals": rs}]}


def _syn_flood(lab, vip: str, port: int, count: int) -> float:
    """``count`` SYNs from 65,536 spoofed sources (198.19.0.0/16) at vip:port, made by the
    live-frames generator in the client's namespace (XDP_TX onto its link; the router's
    end runs XDP_PASS for the time of the flood). Returns the seconds it took."""
    import socket

    from lb.constants import TCP_FLAG_SYN, XDP_PASS
    from lb.kernel.netns import run_in_netns
    from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, xdp_attach, xdp_detach
    from lb.pktgen import PacketGenerator, build_frame
    from netns.lab_bpf import load_xdp_action

    c = lab.client()
    frame = build_frame(4, "tcp", 64, src="198.19.0.0", dst=vip, sport=1024, dport=port,
                        src_mac=bytes.fromhex(c.mac.replace(":", "")),
                        dst_mac=bytes.fromhex(c.gw_mac.replace(":", "")), tcp_flags=TCP_FLAG_SYN)
    fd = load_xdp_action(XDP_PASS, "flood_pass")
    try:
        xdp_attach(c.gw_ifname, fd, XDP_FLAGS_DRV_MODE, netns=lab.router_ns)
    finally:
        os.close(fd)
    try:
        with PacketGenerator() as gen:
            gen.set_template(frame, flows=65536, vary="src_addr")
            t0 = time.monotonic()
            gen.run(count, run_in_netns(c.ns, socket.if_nametoindex, c.ifname), netns=c.ns)
            return time.monotonic() - t0
    finally:
        xdp_detach(c.gw_ifname, XDP_FLAGS_DRV_MODE, netns=lab.router_ns)


def _phase(results: dict, name: str, conns: dict, action) -> None:
    before = {k: v.broken() for k, v in conns.items()}
    extra = action()
    time.sleep(SETTLE)
    results[name] = {k: v.broken() - before[k] for k, v in conns.items()}
    if extra:
        results[name]["note"] = extra


def _report(what: str, results: dict, conns: dict) -> None:
    lines = [f"MEASURED {what}: broken connections per change ({CONNS} per VIP, a request every 100 ms)"]
    for name, r in results.items():
        note = f" ({r['note']})" if "note" in r else ""
        lines.append(f"  {name}: stateless {r['stateless']}, default {r['default']}{note}")
    lines.append("  requests answered: " + ", ".join(f"{k} {v.requests()}" for k, v in conns.items()))
    print("\n".join(lines))


def test_stateless_vip_survives_ring_changes_a_flood_and_a_restart(tmp_path) -> None:
    from netns.lab import Lab
    from netns.longlived import LongLived
    from netns.topology import VIP4

    cfg = parse_config(_config({R[0]: 1, R[1]: 1}))
    with Lab(reals=3, datapath="xdp", config=cfg) as lab:
        lb = lab.balancers()[0]
        pin_dir = lab.state["pin_dirs"][lb.name]
        data = config_to_dict(lab.config)
        d = Daemon(tmp_path, "--pin-dir", pin_dir, "--netns", lb.ns, interface=lb.ifname, datapath="xdp",
                   config=data)
        conns: dict = {}
        try:
            d.start()
            ns = lab.client().ns
            conns = {"stateless": LongLived(ns, VIP4, STATELESS_PORT, CONNS).start(),
                     "default": LongLived(ns, VIP4, DEFAULT_PORT, CONNS).start()}
            assert all(len(c.reals()) == 2 for c in conns.values())
            time.sleep(1.0)
            results: dict = {}
            keys = {k: (VIP4, p, "tcp") for k, p in (("stateless", STATELESS_PORT), ("default", DEFAULT_PORT))}

            def add_real():
                with d.client() as c:
                    for key in keys.values():
                        c.add_real(key, {"address": R[2], "weight": 1})
                rx0 = lab.balancer_stats()["rx_packets"]
                secs = _syn_flood(lab, VIP4, STATELESS_PORT, FLOOD)
                rx = lab.balancer_stats()["rx_packets"] - rx0
                # the flood did reach the balancer: the router's kernel forwarding drops
                # most of it on a busy machine (43% arrived on a quiet one, 3% during a
                # full test run beside other work), so the floor is 2%
                assert rx > FLOOD // 50, rx
                return f"{FLOOD} spoofed SYNs at the stateless VIP in {secs:.1f} s, {rx} frames reached the balancer"

            def weights():
                with d.client() as c:
                    for key in keys.values():
                        c.patch_real(key, R[0], {"weight": 3})

            def restart():
                d.kill(signal.SIGKILL)  # the old program keeps forwarding meanwhile
                shutil.rmtree(pin_dir)
                d.start()
                with d.client() as c:
                    w = c.status()["last_reconcile"]["writes"]
                return f"restarted on fresh maps: {w['prev_ring_slots']} previous-ring slots written"

            _phase(results, "(a) add a real + SYN flood", conns, add_real)
            _phase(results, "(b) change weights", conns, weights)
            _phase(results, "(c) restart, maps wiped", conns, restart)
            with d.client() as c:
                st = c.stats()
            moved = sum(1 for k in conns["stateless"].conns if k.real)  # all alive ones answer
            _report("stateless vs default, one balancer", results, conns)
            assert all(r["stateless"] == 0 for r in results.values()), results
            assert conns["stateless"].broken() == 0, [k.why for k in conns["stateless"].conns if k.why][:5]
            assert moved == CONNS
            assert lab.decap_stats().get("hoplist_forwarded", 0) > 0  # the second chance did work
            assert results["(c) restart, maps wiped"]["default"] > 0  # the contrast the issue expects
            assert st is not None
        finally:
            for c in conns.values():
                c.stop()
            d.stop()


def test_fleet_stateless_vip_survives_losing_a_balancer_after_a_ring_change() -> None:
    from control.client import Client
    from netns.fleet import FleetLab
    from netns.longlived import LongLived
    from netns.teardown import leftovers
    from netns.topology import VIP4

    cfg = parse_config(_config({R[0]: 1, R[1]: 1}))
    lab = FleetLab(reals=3, balancers=2, etcd=True, config=cfg)
    conns: dict = {}
    try:
        lab.build()
        ns = lab.client().ns
        conns = {"stateless": LongLived(ns, VIP4, STATELESS_PORT, CONNS).start(),
                 "default": LongLived(ns, VIP4, DEFAULT_PORT, CONNS).start()}
        rx = {n: lab.balancer_stats(n)["rx_packets"] for n in ("lb1", "lb2")}
        assert all(v > 0 for v in rx.values()), rx  # ECMP uses both
        results: dict = {}

        def change():
            with Client(socket=lab.paths("lb1")["socket"], timeout=30) as c:
                for p in (STATELESS_PORT, DEFAULT_PORT):
                    c.add_real((VIP4, p, "tcp"), {"address": R[2], "weight": 1})
                gen = c.status()["generation"]
            deadline = time.monotonic() + 20  # lb2 adopts the change from etcd
            while time.monotonic() < deadline:
                with Client(socket=lab.paths("lb2")["socket"], timeout=30) as c2:
                    if c2.status()["generation"] == gen:
                        return
                time.sleep(0.2)
            raise AssertionError("lb2 did not adopt the change")

        def kill():
            lab.kill_balancer("lb1")
            lab.wait_ecmp(1, timeout=15)
            time.sleep(3)  # the hold timer and TCP's retransmits
            return "lb1 killed, its flows moved to lb2 by ECMP"

        _phase(results, "(d0) ring change through etcd", conns, change)
        _phase(results, "(d) kill one of two balancers", conns, kill)
        _report("stateless vs default, fleet of two", results, conns)
        assert all(r["stateless"] == 0 for r in results.values()), results
        assert results["(d) kill one of two balancers"]["default"] > 0
    finally:
        for c in conns.values():
            c.stop()
        st, sp = lab.state, lab.state_path
        lab.teardown()
    assert leftovers(st, sp) == []

